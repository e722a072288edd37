"""`python -m meg.fuzz TARGET [libFuzzer flags] [CORPUS_DIR]`: one target under atheris.

The corpus folder (default: a fresh temporary one) is seeded with `meg.fuzz.seeds(TARGET)`;
libFuzzer's flags pass through (e.g. ``-runs=100000 -rss_limit_mb=2048``); an input
that takes over `HANG_S` is kept as ``timeout-*`` and counted by `meg fuzz`. An
exception other than `MegError` is a crash: libFuzzer writes the input (``crash-*``) and
the process exits non-zero.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

HANG_S = 1.0
"""An input that takes longer is a hang (libFuzzer's own -timeout counts whole seconds)."""


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

    prefix = next((a.split("=", 1)[1] for a in rest if a.startswith("-artifact_prefix=")), str(corpus) + "/")

    def one_input(data: bytes) -> None:
        started = time.perf_counter()
        check(target, data)
        took = time.perf_counter() - started
        if took > HANG_S:  # kept like libFuzzer's timeout-* inputs, and the run goes on
            Path(f"{prefix}timeout-{hashlib.sha1(data).hexdigest()}").write_bytes(data)
            print(f"meg.fuzz: input took {took:.2f} s (> {HANG_S} s), kept", file=sys.stderr)

    atheris.Setup([argv[0], *rest], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
