"""Run mlx_lm's own command line with the tilewise plugin enabled.

    python -m tilewise.mlx_lm [tilewise options] <mlx_lm subcommand> [its arguments...]
    python -m tilewise.mlx_lm generate --model ./my-model --prompt "hello" --max-tokens 32
    python -m tilewise.mlx_lm server --model ./my-model --port 8080
    python -m tilewise.mlx_lm --policy best_program.py generate --model ./my-model

Tilewise options come *before* the subcommand (everything after it belongs to mlx_lm, untouched):
  --policy PATH     a policy JSON or an OpenEvolve best_program.py instead of the daemon
  --timeout SEC     budget for asking the daemon (default 0.2)
  --quiet           do not print the one status line per loaded model on stderr

The plugin is enabled first, then control goes to mlx_lm's own entry point (`mlx_lm.cli.main`), so
every subcommand, option and behaviour is exactly mlx_lm's; only models it loads through
`mlx_lm.load` get the policy.
"""

from __future__ import annotations

import sys


def _parse(argv: list) -> tuple:
    """Splits argv into (tilewise options, mlx_lm argv starting at the subcommand)."""
    opts = {"policy": None, "timeout": None, "quiet": False}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if name == "--quiet":
            opts["quiet"] = True
            i += 1
            continue
        if name not in ("--policy", "--timeout"):
            raise SystemExit(
                f"tilewise.mlx_lm: unknown option {name} (tilewise options: --policy, --timeout, "
                f"--quiet; mlx_lm's options go after the subcommand)"
            )
        if not eq:
            i += 1
            if i >= len(argv):
                raise SystemExit(f"tilewise.mlx_lm: {name} needs a value")
            value = argv[i]
        if name == "--timeout":
            try:
                opts["timeout"] = float(value)
            except ValueError:
                raise SystemExit(f"tilewise.mlx_lm: --timeout expects seconds, got {value!r}") from None
        else:
            opts["policy"] = value
        i += 1
    if i >= len(argv):
        raise SystemExit(
            "tilewise.mlx_lm: missing the mlx_lm subcommand (e.g. generate, server, chat, lora)\n"
            "usage: python -m tilewise.mlx_lm [--policy PATH] [--timeout S] [--quiet] <subcommand> ..."
        )
    return opts, argv[i:]


def main(argv=None) -> None:
    opts, rest = _parse(list(sys.argv[1:] if argv is None else argv))
    from . import plugin

    kwargs = {"announce": not opts["quiet"]}
    if opts["timeout"] is not None:
        kwargs["timeout"] = opts["timeout"]
    plugin.enable_optimizations(opts["policy"], **kwargs)

    import mlx_lm.cli

    # mlx_lm.cli.main() pops argv[1] as the subcommand and hands the rest to that module's main().
    # argv[0] names the program in mlx_lm's --help ("usage: tilewise.mlx_lm generate ...").
    sys.argv = [f"tilewise.mlx_lm {rest[0]}", *rest]
    mlx_lm.cli.main()


if __name__ == "__main__":
    main()
