"""What a user runs beside the pipeline, on what it made: `python -m tools.<name>`.

    predict      classify pictures of digits with a trained classifier
    serve        a local page to draw or upload a digit and see what the classifier reads
    experiments  the experiments' table, narrowed to what differs
    compare      the change report of two runs: params, metrics, charts, provenance
    sweep        one sweep shared by several hosts
    preset       a preset as one `dvc exp run`
    search       a search that picks each trial from the results so far (Optuna over `dvc exp run`)

Like the stages, they import the package mnist_cnn/, never a stage.
"""
