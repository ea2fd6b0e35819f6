"""The pipeline's stages, one script each, as dvc.yaml runs them: `python -m stages.<name>`.

Each is a short main() over the package mnist_cnn/, which holds everything they share; nothing imports a
stage. Run that way, the stage's first import is this file: from here a SIGINT or SIGTERM ends it with one
line, and under DVC the dvc process is noted (mnist_cnn.stage.on_start). Imported by other code (the tests,
a notebook), it changes nothing.
"""

import sys

if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it imports the package of `python -m stages.x`
    from mnist_cnn import stage

    stage.on_start()
