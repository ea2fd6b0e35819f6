"""A trained classifier, ready to predict, for evaluate, predict and serve."""

from pathlib import Path

import numpy as np

from mnist_cnn.backend import import_keras, import_onnxruntime
from mnist_cnn.errors import UserError
from mnist_cnn.files import MANIFEST, check_files, read_json
from mnist_cnn.stage import lock_restore_hint


class TrainedClassifier:
    """A trained classifier, ready to predict: ONNX Runtime on classifier.onnx where train wrote one, else
    Keras.

    ONNX Runtime starts in a fraction of a second where TensorFlow takes
    seconds; train checked that the two give the same probabilities (to 1e-5).
    `name` says which one answers.
    """

    def __init__(self, folder):
        folder = Path(folder)
        names = ["classifier.keras", "params.json"]
        restore = None if (folder / MANIFEST).is_file() else lock_restore_hint(folder)
        if restore:  # DVC deleted it for a run that failed, or a checkout is pending: no need to retrain
            raise UserError(f"{folder} is not there, but dvc.lock names it and DVC's cache holds it: "
                            f"`{restore}` puts it back")
        self.onnx = "classifier.onnx" in read_json(folder / MANIFEST).get("files", {})
        check_files(folder, names + ["classifier.onnx"] * self.onnx)
        if self.onnx:
            onnxruntime = import_onnxruntime()
            self.session = onnxruntime.InferenceSession(str(folder / "classifier.onnx"),
                                                        providers=["CPUExecutionProvider"])
            self.name = f"onnxruntime {onnxruntime.__version__}"
            return
        trained = read_json(folder / "params.json")
        keras = import_keras(trained["base"]["backend"], device="cpu")
        try:
            self.model = keras.models.load_model(folder / "classifier.keras")
        except ValueError as err:  # Keras's word for a missing or unreadable file
            raise UserError(f"cannot load {folder / 'classifier.keras'} ({err}); run `dvc repro` to make it") \
                from None
        self.name = f"keras {keras.__version__} ({trained['base']['backend']})"

    def predict(self, pixels):
        """(N, 28, 28) uint8 -> (N, 10) float64 probabilities."""
        if self.onnx:
            session = self.session
            return np.asarray(session.run(None, {session.get_inputs()[0].name: pixels})[0], dtype=np.float64)
        return np.asarray(self.model.predict(pixels, verbose=0), dtype=np.float64)
