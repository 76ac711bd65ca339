"""`callbridge` command line.

Each command group registers itself with a `add_<group>_parser(subparsers)` function listed in
PARSER_BUILDERS and its handlers in DISPATCH (keyed by the dotted command path set with
`set_defaults(command=...)`), so `serve`, `stream`, `jobs`, `keys` and `db` can be added without
touching the others. Handlers take the parsed namespace and return an exit code.

Exit codes: 0 ok, 1 the operation failed (e.g. a model did not verify), 2 bad input (unknown
model, missing file or package, bad option), always with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .commands.usage import PROG, Parser as _Parser, UsageError


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# --------------------------------------------------------------------------- models


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    from .models.store import FTYPE_CHOICES

    p = sub.add_parser("models", help="install, list and verify whisper models")
    msub = p.add_subparsers(dest="models_command", metavar="{install,list,verify,path}", parser_class=_Parser)
    msub.required = True

    def type_opt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--type", dest="ftype", choices=FTYPE_CHOICES, help="weight type (default: see models list)")

    def cache_opt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--cache-dir", help="model cache (default $CALLBRIDGE_MODEL_DIR or ~/.cache/callbridge/models)")

    q = msub.add_parser("install", help="convert a bundled model into the cache")
    q.add_argument("name", nargs="?", default="tiny.en", help="tiny.en (default) or base")
    type_opt(q)
    q.add_argument("--force", action="store_true", help="convert again even if cached")
    q.add_argument("--no-verify", action="store_true", help="skip the test transcription after installing")
    cache_opt(q)
    q.set_defaults(command="models.install")

    q = msub.add_parser("list", help="registry models, installed or not, with cached files")
    cache_opt(q)
    q.set_defaults(command="models.list")

    q = msub.add_parser("verify", help="check a model: layout, checksum, one test transcription")
    q.add_argument("model", metavar="NAME_OR_PATH")
    type_opt(q)
    q.add_argument("--no-transcribe", action="store_true", help="layout and checksum only")
    cache_opt(q)
    q.set_defaults(command="models.verify")

    q = msub.add_parser("path", help="print the cached file of a model")
    q.add_argument("name")
    type_opt(q)
    q.add_argument("--install", action="store_true", help="install it first if needed")
    cache_opt(q)
    q.set_defaults(command="models.path")


def cmd_models_install(args: argparse.Namespace) -> int:
    from .models import store

    path = store.install(args.name, args.ftype, args.cache_dir, force=args.force)
    if not args.no_verify:
        store.verify(path)
    print(path)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from .models import store

    print(f"cache: {store.model_dir(args.cache_dir)}   default type: {store.ftype_name(store.DEFAULT_FTYPE)}")
    for st in store.status(args.cache_dir):
        versions = ", ".join(f"{d} {v}" for d, v in st.versions.items() if v)
        source = f"source: {versions}" if st.available else f"not available: {st.install_hint}"
        print(f"{st.name:<8} {st.description}")
        print(f"         {source}")
        if not st.cached:
            print("         not installed")
        for c in st.cached:
            note = "" if c.manifest_ok else "  (no valid manifest: reinstall)"
            print(f"         {c.ftype:<5} {_human(c.size):>9}  {c.path}{note}")
    return 0


def _model_path(name_or_path: str, ftype: str | None, cache_dir: str | None) -> str:
    """A registry name's cached file (must be installed), or the path as given."""
    from .models import registry, store

    name, _, ft = name_or_path.rpartition(":") if ":" in name_or_path else (name_or_path, "", None)
    if name in registry.REGISTRY:
        p = store.cached_path(name, ft or ftype, cache_dir)
        if not p.is_file():
            t = store.ftype_name(store.as_ftype(ft or ftype))
            raise UsageError(f"{name} ({t}) is not installed: run `{PROG} models install {name} --type {t}`")
        return str(p)
    return name_or_path


def cmd_models_verify(args: argparse.Namespace) -> int:
    from .models import store

    result = store.verify(_model_path(args.model, args.ftype, args.cache_dir), transcribe=not args.no_transcribe)
    print(result.summary())
    return 0


def cmd_models_path(args: argparse.Namespace) -> int:
    from .models import store

    if args.install:
        print(store.install(args.name, args.ftype, args.cache_dir))
    else:
        print(_model_path(args.name, args.ftype, args.cache_dir))
    return 0


# --------------------------------------------------------------------------- wiring

from .commands import call as _call, db as _db, jobs as _jobs, keys as _keys, serve as _serve  # noqa: E402
from .commands import stream as _stream  # noqa: E402
from .commands import webhooks as _webhooks, webrtc as _webrtc  # noqa: E402

PARSER_BUILDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _serve.add_serve_parser, _stream.add_stream_parser, _jobs.add_jobs_parser, _keys.add_keys_parser,
    _call.add_call_parser, _webhooks.add_webhooks_parser, _webrtc.add_webrtc_parser, _db.add_db_parser,
    add_models_parser]

DISPATCH: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve.cmd_serve,
    "stream": _stream.cmd_stream,
    "models.install": cmd_models_install,
    "models.list": cmd_models_list,
    "models.verify": cmd_models_verify,
    "models.path": cmd_models_path,
    **_jobs.DISPATCH,
    **_webhooks.DISPATCH,
    **_keys.DISPATCH,
    **_call.DISPATCH,
    **_webrtc.DISPATCH,
    **_db.DISPATCH,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Self-hosted telephony transcription bridge on whisper.cpp")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .client.errors import ApiError
    from .client.stream import StreamError
    from .config import ConfigError
    from .models.registry import ModelError
    from .models.store import VerifyError

    parser = build_parser()
    args = parser.parse_args(argv)
    handler = DISPATCH.get(getattr(args, "command", ""))
    if handler is None:
        parser.error(f"no handler for {args.group!r}")
    try:
        return handler(args)
    except VerifyError as e:
        print(f"{PROG}: verification failed: {e}", file=sys.stderr)
        return 1
    except (UsageError, ModelError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ApiError, StreamError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
