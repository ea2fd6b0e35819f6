"""Write templates/plots.html, the page `dvc plots show` fills, with Vega, Vega-Lite and Vega-Embed inside it.

    python templates/make_plots_page.py      # needs npm and its registry; run it to change a version below

DVC's own page loads the three libraries from a CDN, so offline it shows no
chart at all. This page carries their minified builds (from the npm packages
pinned below), so it renders with no network; .dvc/config points DVC at it
(plots.html_template). THIRD_PARTY_LICENSES.txt, written beside it, holds the
license of every package in the three packages' npm dependency tree (a
superset of what their builds bundle).
"""

import json
import subprocess
import tempfile
from pathlib import Path

PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}  # DVC's Vega-Lite v5 schema
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
HERE = Path(__file__).resolve().parent
LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "license", "LICENSE-MIT.txt", "COPYING")
# vega ships no LICENSE file in its npm package; this is the text of the vega repository's LICENSE.
VEGA_LICENSE = """Copyright (c) 2015-2023, University of Washington Interactive Data Lab
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its contributors
   may be used to endorse or promote products derived from this software
   without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>MNIST CNN: DVC plots</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
body > div {{ display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }}
footer {{ color: #666; font-size: small; margin-top: 2em; }}
</style>
<!-- {versions}: BSD-3-Clause, University of Washington Interactive Data Lab;
     bundled code and its licenses: templates/THIRD_PARTY_LICENSES.txt in the project. -->
{scripts}
</head>
<body>
<h1>MNIST CNN: DVC plots</h1>
{{plot_divs}}
<footer>Drawn offline with {versions} (carried by this page).</footer>
</body>
</html>
"""


def page(builds):
    """The template text: DVC fills {plot_divs} and {refresh_tag}; no {scripts}, so no CDN."""
    scripts = "\n".join(f"<script>/* {name}@{PACKAGES[name]} */\n{js}\n</script>" for name, js in builds.items())
    versions = ", ".join(f"{name.replace('-', ' ').title().replace(' ', '-')} {v}" for name, v in PACKAGES.items())
    return PAGE.format(refresh_tag="{refresh_tag}", versions=versions, scripts=scripts)


def check_build(name, js):
    """The build without its source-map comment (nothing to fetch); refused if it would break the page."""
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad in js:
            raise SystemExit(f"{name}'s build contains {bad!r}; it cannot be inlined as it is")
    return "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL=")).strip()


def licenses(node_modules):
    """One section per package of the tree: name@version, its declared license, its license text."""
    sections = []
    for manifest in sorted(node_modules.glob("**/package.json")):
        folder = manifest.parent
        if folder.parent.name != "node_modules" and folder.parent.parent.name != "node_modules":
            continue  # a package's inner package.json files (e.g. build/package.json)
        meta = json.loads(manifest.read_text())
        if "name" not in meta or "version" not in meta:
            continue
        text = next(((folder / n).read_text() for n in LICENSE_NAMES if (folder / n).is_file()), None)
        if text is None:
            text = VEGA_LICENSE if meta["name"].startswith("vega") else f"(no license file; package.json says " \
                   f"{meta.get('license')!r}, author {meta.get('author')!r})"
        sections.append(f"{'=' * 78}\n{meta['name']}@{meta['version']}  ({meta.get('license')})\n{'=' * 78}\n\n"
                        f"{text.strip()}\n")
    return "\n".join(sections)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "package.json").write_text("{}")
        specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
        subprocess.run(["npm", "install", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund", *specs],
                       cwd=tmp, check=True)
        builds = {name: check_build(name, (tmp / "node_modules" / name / path).read_text())
                  for name, path in BUILDS.items()}
        header = ("Third-party code carried by templates/plots.html: the minified builds of "
                  f"{', '.join(specs)}.\nBelow, the license of every package in their npm dependency tree.\n\n")
        (HERE / "THIRD_PARTY_LICENSES.txt").write_text(header + licenses(tmp / "node_modules"))
    (HERE / "plots.html").write_text(page(builds))
    print(f"wrote {HERE / 'plots.html'} and {HERE / 'THIRD_PARTY_LICENSES.txt'} ({', '.join(specs)})")


if __name__ == "__main__":
    main()
