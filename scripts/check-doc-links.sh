#!/usr/bin/env bash
# Checks the rendered HTML of the workspace's docs for links rustdoc could not turn into links: an
# intra-doc link whose target has no page shows as literal text (`[Error::Unavailable]`, rendered
# `[<code>Error::Unavailable</code>]`) or as an `href` that is still a Rust path, and rustdoc does
# not always warn about it (e.g. a link into another crate whose pages were not written yet).
#
#   scripts/check-doc-links.sh [DOC_DIR [CRATE...]]
#
# DOC_DIR defaults to target/doc (or $CARGO_TARGET_DIR/doc); the crates checked default to every
# library and binary of the workspace (names with `_`). `scripts/check-doc-downstream.sh` uses it
# on the docs of a crate that depends on ours.
#
# Build the docs first, twice, the second time one crate at a time (rustdoc links into another
# crate only if that crate's pages exist and are not being rewritten meanwhile), as .ci/run does:
#   cargo doc --workspace --no-deps
#   RUSTDOCFLAGS="--cfg locker_doc_links" cargo doc --workspace --no-deps -j 1
# Pages of blanket implementations (docs copied from other crates, e.g. tracing's) are not ours
# and are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
doc=${1:-${CARGO_TARGET_DIR:-target}/doc}
[ -d "$doc" ] || { echo "check-doc-links: no $doc: build the docs first" >&2; exit 1; }
command -v python3 >/dev/null || { echo "check-doc-links: needs python3" >&2; exit 1; }
if [ $# -gt 1 ]; then
  shift
  crates="$*"
else
  crates=$(cargo metadata -q --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(" ".join(t["name"].replace("-","_") for p in json.load(sys.stdin)["packages"] for t in p["targets"] if "lib" in t["kind"] or "bin" in t["kind"]))')
fi
python3 - "$doc" $crates <<'PY'
import glob, html, os, re, sys

doc, crates = sys.argv[1], sys.argv[2:]
# `[<code>Path</code>]` or `[Path]` left as text, or an href that is still a Rust path.
literal = re.compile(
    r'\[(?:<code>)?(?:crate|self|super|[A-Za-z_]\w*)(?:::\w+)*(?:\(\))?(?:</code>)?\]'
    r'|href="(?:crate|self|super|[a-z_]+)::[^"]*"'
)
# Code (blocks, signatures), the sidebar, comments and scripts hold brackets that are not links.
code = re.compile(
    r'<pre[^>]*>.*?</pre>|<(h\d)[^>]*class="code-header"[^>]*>.*?</\1>|<nav[^>]*>.*?</nav>'
    r'|<!--.*?-->|<script[^>]*>.*?</script>',
    re.S,
)
found, pages = [], 0
missing = [c for c in crates if not os.path.isdir(os.path.join(doc, c))]
if missing:
    sys.exit(f"check-doc-links: no pages for {', '.join(missing)} under {doc}: build the docs first")
for crate in crates:
    for page in glob.glob(os.path.join(doc, crate, "**", "*.html"), recursive=True):
        pages += 1
        text = open(page, encoding="utf-8").read()
        cut = text.find('id="blanket-implementations"')
        if cut >= 0:
            text = text[:cut]
        text = code.sub("", text)
        for m in literal.finditer(text):
            anchor = text.rfind(' id="', 0, m.start())
            where = text[anchor + 5 : text.find('"', anchor + 5)] if anchor >= 0 else "top"
            found.append(f"{os.path.relpath(page, doc)}#{where}: {html.unescape(re.sub('<[^>]+>', '', m.group(0)))}")
if pages == 0:
    sys.exit(f"check-doc-links: no pages of {', '.join(crates)} under {doc}")
for line in found:
    print(line)
if found:
    sys.exit(f"check-doc-links: {len(found)} unresolved links in {pages} pages (above)")
print(f"check-doc-links: {pages} pages, no unresolved link")
PY
