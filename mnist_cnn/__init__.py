"""The library beneath the pipeline: the stages (stages/), the tools (tools/) and the benchmarks (bench/)
import it; it imports none of them.

    params     params.yaml's schemas and rules, load_params()
    errors     UserError: one line the user can act on
    stage      run(): signals, the watch on dvc, stderr's filter, the restore hint, the quick exit
    files      atomic outputs, strict JSON, manifests, .npz headers
    backend    Keras on its backend, devices, threads, precision, the CPU's units; the private-API shims
    model      the network from params, its initial weights, the classifier with the standardization inside
    training   the fit, its guards and checks, the ONNX export, the run's record
    facts      what a run recorded, gathered once for the report
    pages      the report rendered: Markdown and HTML
    vision     a picture of a digit -> MNIST's 28x28
    inference  a trained classifier, ready to predict

The facts every module shares about MNIST live here, once.
"""

SIDE = 28                       # MNIST's images are SIDE x SIDE pixels
IMAGE_SHAPE = (SIDE, SIDE, 1)   # as the network takes them: one channel
N_CLASSES = 10                  # the digits 0..9
PIXEL_LEVELS = 256              # uint8 grey levels, 0..255
