"""Tables as Markdown, and the layer table's rows: summary.md (build_init_weights) and the report render them."""


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


LAYER_COLUMNS = ("layer", "type", "output shape", "weights")


def layer_rows(layers, bold_total=False):
    """layer_table's rows for a table under LAYER_COLUMNS, the total last."""
    total = f"{sum(layer['weights'] for layer in layers):,}"
    rows = [[layer["layer"], layer["type"], layer["output_shape"], f"{layer['weights']:,}"] for layer in layers]
    return rows + [["**total**", "", "", f"**{total}**"] if bold_total else ["total", "", "", total]]
