"""Benchmarks: each measures, none is a test. Run one from the project root as `python -m bench.<name>`.

    speed         the pipeline's time per stage and the fit against the notebook's reference (bench/results/)
    devices       CPU against GPU at the seed's settings and the fast preset
    reference     the seed notebook's procedure, as written, for comparison
    step_profile  one training step, op by op (TensorFlow's profiler)
    peak          the CPU's matrix-product rate: the ceiling
    sweep         experiments queued in parallel
    predict_speed predict's start and answer time
    real_digits   the classifier on real photos and scans of digits

Their results are committed in bench/results/, each naming its CPU, its features and its date.
"""
