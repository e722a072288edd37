"""`python -m meg.fuzz TARGET [libFuzzer flags] [CORPUS_DIR]`: one target under atheris.

The corpus folder (default: a fresh temporary one) is seeded with `meg.fuzz.seeds(TARGET)`;
libFuzzer's flags pass through (e.g. ``-runs=100000 -timeout=1 -rss_limit_mb=2048``). An
exception other than `MegError` is a crash: libFuzzer writes the input (``crash-*``) and
the process exits non-zero.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    try:
        import atheris
    except ImportError:  # pragma: no cover - the dev extra installs it
        sys.exit("meg fuzz needs atheris: pip install atheris")
    if len(argv) < 2:
        sys.exit("usage: python -m meg.fuzz TARGET [libFuzzer flags] [CORPUS_DIR]")
    target = argv[1]
    with atheris.instrument_imports(include=["meg"]):
        import meg.codecs.chain  # noqa: F401
        import meg.codecs.framing  # noqa: F401
        import meg.convert  # noqa: F401
        import meg.models.captions  # noqa: F401
        import meg.recipes.plan  # noqa: F401
        import meg.recipes.report  # noqa: F401
        import meg.services.limits  # noqa: F401
        import meg.services.wire  # noqa: F401
    from meg.fuzz import TARGETS, check, seeds

    if target not in TARGETS:
        sys.exit(f"unknown fuzz target {target!r}; targets: {', '.join(TARGETS)}")
    rest = argv[2:]
    dirs = [a for a in rest if not a.startswith("-")]
    if not dirs:
        dirs = [tempfile.mkdtemp(prefix=f"meg-fuzz-{target}-")]
        rest.append(dirs[0])
    corpus = Path(dirs[0])
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds(target)):
        (corpus / f"seed-{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        check(target, data)

    atheris.Setup([argv[0], *rest], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
