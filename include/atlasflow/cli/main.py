"""The ``atlasflow`` command line.

Exit codes: 0 success, 2 invalid input (the reasons are printed one per line on stderr),
3 ``plan --strict`` found changes to saved batches, 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from atlasflow import __version__
from atlasflow.core.config import (
    AtlasConfig,
    ConfigError,
    config_reference,
    load_config,
    run_overridable_keys,
)
from atlasflow.intake.manifest import ManifestError, read_manifest
from atlasflow.intake.plan import load_plan, make_plan, save_plan

EXIT_INVALID = 2
EXIT_PLAN_CHANGED = 3


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _config(args: argparse.Namespace) -> AtlasConfig:
    return load_config(getattr(args, "config", None))


def _manifest_args(args: argparse.Namespace, config: AtlasConfig) -> dict[str, Any]:
    return {
        "sheet": args.sheet if args.sheet is not None else config.manifest.sheet,
        "allowed_file_root": args.allowed_file_root or config.manifest.allowed_file_root,
    }


def _manifest_path(args: argparse.Namespace, config: AtlasConfig) -> str:
    path = args.file or config.manifest.path
    if not path:
        raise ConfigError(["no manifest given: pass FILE or set manifest.path in the config"])
    return path


def cmd_manifest_check(args: argparse.Namespace, out: TextIO) -> int:
    config = _config(args)
    manifest = read_manifest(_manifest_path(args, config), **_manifest_args(args, config))
    if args.json:
        json.dump({"valid": True, "source": manifest.source, "sheet": manifest.sheet, "sha256": manifest.sha256,
                   "warnings": list(manifest.warnings), "datasets": [d.to_dict() for d in manifest]}, out, indent=1)
        out.write("\n")
        return 0
    by_type: dict[str, int] = {}
    for d in manifest:
        by_type[d.type] = by_type.get(d.type, 0) + 1
    known = [d.expected_bytes for d in manifest if d.expected_bytes is not None]
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(by_type.items()))
    sheet = f" (sheet '{manifest.sheet}')" if manifest.sheet else ""
    out.write(f"{manifest.source}{sheet}: valid, {len(manifest)} datasets ({kinds}); "
              f"expected size {_human_bytes(sum(known))} known for {len(known)} of them\n")
    for w in manifest.warnings:
        out.write(f"warning: {w}\n")
    return 0


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    config = _config(args)
    manifest = read_manifest(_manifest_path(args, config), **_manifest_args(args, config))
    state = Path(args.state) if args.state else (config.plan_path if args.config or config.manifest.path else None)
    previous = None if (args.fresh or state is None) else load_plan(state)
    batch_size = args.batch_size if args.batch_size is not None else config.plan.batch_size
    max_bytes = int(args.max_batch_gb * 1e9) if args.max_batch_gb is not None else config.plan.max_batch_bytes
    plan = make_plan(manifest, batch_size=batch_size, max_batch_bytes=max_bytes, previous=previous)
    if args.save:
        if state is None:
            raise ConfigError(["--save needs --state PATH or a config (the plan is saved as <base_dir>/state/plan.json)"])
        save_plan(plan, state)
    sizes = _plan_sizes(config, manifest, probe=not args.no_probe, cache_file=state is not None)
    if args.json:
        json.dump({**plan.to_dict(), "sizes": sizes}, out, indent=1)
        out.write("\n")
    else:
        for b in plan.batches:
            tag = "saved" if b.sealed else "new"
            known = [sizes[d] for d in b.dataset_ids if d in sizes]
            guessed = any(s["source"] == "default" for s in known)
            total = _human_bytes(sum(s["bytes"] for s in known)) + ("*" if guessed else " ")
            out.write(f"{b.batch_id}  {len(b.dataset_ids)} datasets  {total:>13}  "
                      f"[{tag}]  {', '.join(b.dataset_ids)}\n")
        _write_size_sources(out, sizes, config)
        sealed = len(plan.batches) - len(plan.new_batches)
        out.write(f"{len(plan.batches)} batches for {len(manifest)} datasets (batch size {batch_size}"
                  f"{'' if max_bytes is None else ', at most ' + _human_bytes(max_bytes)}); "
                  f"{sealed} from the saved plan, {len(plan.new_batches)} new"
                  f"{'; saved to ' + str(state) if args.save else ''}\n")
    for change in plan.changes:
        _err(f"changed: {change}")
    return EXIT_PLAN_CHANGED if (args.strict and plan.changes) else 0


def _plan_sizes(config: AtlasConfig, manifest: Any, *, probe: bool, cache_file: bool) -> dict[str, dict[str, Any]]:
    """Each row's download size and where it comes from: manifest, its source (asked, cached), or the default."""
    from atlasflow.acquire.sizes import known_sizes

    found = known_sizes(config, manifest.datasets, probe=probe, cache_file=cache_file)
    default = int(config.storage.unknown_size_gb * 1e9)
    out: dict[str, dict[str, Any]] = {}
    for d in manifest:
        if d.expected_bytes is not None:
            out[d.dataset_id] = {"bytes": d.expected_bytes, "source": "manifest"}
        elif (p := found.get(d.dataset_id)) is not None and p.bytes:
            out[d.dataset_id] = {"bytes": p.bytes, "source": p.source}
        else:
            why = p.error if p is not None else ("not asked (--no-probe)" if not probe else "download.size_probe off")
            out[d.dataset_id] = {"bytes": default, "source": "default", "why": why}
    return out


def _write_size_sources(out: TextIO, sizes: dict[str, dict[str, Any]], config: AtlasConfig) -> None:
    by_source: dict[str, int] = {}
    for s in sizes.values():
        by_source[s["source"]] = by_source.get(s["source"], 0) + 1
    out.write("sizes: " + ", ".join(f"{n} from {src}" for src, n in sorted(by_source.items())) + "\n")
    guessed = {k: s for k, s in sizes.items() if s["source"] == "default"}
    if guessed:
        out.write(f"* storage.unknown_size_gb ({config.storage.unknown_size_gb:g} GB) assumed for {len(guessed)} "
                  "row(s); set expected_bytes for them:\n")
        for k, s in guessed.items():
            out.write(f"  {k}: {s['why']}\n")


def cmd_config_show(args: argparse.Namespace, out: TextIO) -> int:
    config = _config(args)
    if args.json:
        json.dump(config.to_dict(), out, indent=1)
        out.write("\n")
        return 0
    values = config.to_dict()
    for row in config_reference():
        value: Any = values
        for part in row["key"].split("."):  # nested sections too (tracking.mlflow.enabled)
            value = value[part]
        out.write(f"{row['key']} = {value!r}    # {row['help']}\n")
    return 0


def render_config_reference() -> str:
    """docs/configuration.md, generated from the config dataclasses so it cannot drift."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `atlasflow config docs` from `include/atlasflow/core/config.py`; do not edit by hand.",
        "Set keys in a YAML/JSON file (`$ATLASFLOW_CONFIG` or `include/config/atlasflow.yaml`), in the",
        "`atlasflow_overrides` Airflow Variable, or per run in the `config_overrides` Param (dotted keys).",
        "",
    ]
    section = None
    for row in config_reference():
        name = row["key"].split(".")[0]
        if name != section:
            section = name
            lines += ["", f"## `{name}`", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        bounds = " ".join(b for b in (f"≥ {row['min']:g}" if row["min"] is not None else "",
                                      f"≤ {row['max']:g}" if row["max"] is not None else "") if b)
        default = "" if row["default"] is None else f"`{row['default']}`"
        lines.append(f"| `{row['key']}` | {row['type']} | {default} | {bounds} | {row['help']} |")
    lines += ["", "## Per-run overrides", "",
              "The `atlasflow_overrides` Variable and a run's `config_overrides` Param may set only these keys: every",
              "number, switch and fixed choice, and the text keys that name no program, path, URL, connection or",
              "recipient. Every other key (`download.sra_command`, `slurm.python`, `slurm.env_activate`,",
              "`slurm.conn_id`, paths, URLs, …) and every key that shapes the DAG (`manifest.*`, `plan.*`,",
              "`storage.base_dir`, `retrain.schedule`) is refused with the reason: set them in the config file.",
              "No text value anywhere may hold a control character (newline, tab, …): it is refused when the",
              "config is loaded and again when an sbatch script is rendered.", ""]
    section = None
    for key in run_overridable_keys():
        name = key.split(".")[0]
        if name != section:
            section = name
            lines.append(f"- `{name}`: " + ", ".join(f"`{k.split('.', 1)[1]}`" for k in run_overridable_keys()
                                                    if k.startswith(name + ".")))
    return "\n".join(lines) + "\n"


def cmd_config_docs(args: argparse.Namespace, out: TextIO) -> int:
    out.write(render_config_reference())
    return 0


def cmd_validate_system(args: argparse.Namespace, out: TextIO) -> int:
    from atlasflow.ops.validate import system_report

    requirements = Path(args.requirements) if args.requirements else Path(__file__).resolve().parents[2] / "requirements.txt"
    summary = system_report(_config(args), requirements=requirements, gpu=not args.no_gpu)
    if args.json:
        json.dump(summary, out, indent=1)
        out.write("\n")
    else:
        for c in summary["checks"]:
            out.write(f"[{c['status']:>4}] {c['name']:<22} {c['detail']}\n")
        out.write(f"overall: {summary['status']}\n")
    return 1 if summary["status"] == "fail" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasflow", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"atlasflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="config file (.yaml/.json); default $ATLASFLOW_CONFIG, else built-in defaults")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def manifest_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", nargs="?", help="manifest (.xlsx/.csv); default manifest.path from the config")
        p.add_argument("--sheet", help="worksheet of an .xlsx manifest (default: the first)")
        p.add_argument("--allowed-file-root", help="accept file:// URLs below this folder")

    manifest = sub.add_parser("manifest", help="work with the dataset manifest")
    msub = manifest.add_subparsers(dest="manifest_command", required=True)
    check = msub.add_parser("check", help="validate a manifest; exit 2 and list every problem when invalid")
    manifest_opts(check)
    common(check)
    check.set_defaults(func=cmd_manifest_check)
    from atlasflow.cli.cellxgene import register as register_cellxgene

    register_cellxgene(msub)
    from atlasflow.cli.geo import register as register_geo

    register_geo(msub)

    plan = sub.add_parser("plan", help="show (and optionally save) the stable batch plan")
    manifest_opts(plan)
    common(plan)
    plan.add_argument("--batch-size", type=int, help="datasets per batch (default plan.batch_size)")
    plan.add_argument("--max-batch-gb", type=float, help="also cap a batch's expected size, GB")
    plan.add_argument("--state", help="saved plan to extend (default <base_dir>/state/plan.json with --config)")
    plan.add_argument("--fresh", action="store_true", help="ignore the saved plan")
    plan.add_argument("--save", action="store_true", help="write the plan to the state file, sealing its batches")
    plan.add_argument("--strict", action="store_true", help="exit 3 when saved batches lost or changed rows")
    plan.add_argument("--no-probe", action="store_true",
                      help="do not ask sources for sizes (rows without expected_bytes use cached sizes or the default)")
    plan.set_defaults(func=cmd_plan)

    config = sub.add_parser("config", help="inspect the configuration")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective configuration (validates it)")
    common(show)
    show.set_defaults(func=cmd_config_show)
    validate = sub.add_parser("validate-system", help="check Python, packages, GPU, disk, memory, the manifest and its tools, the vocabulary; pick the memory strategy")
    common(validate)
    validate.add_argument("--requirements", help="pins to compare installed versions with (default: the checkout's)")
    validate.add_argument("--no-gpu", action="store_true", help="skip the CUDA check (avoids importing torch)")
    validate.set_defaults(func=cmd_validate_system)
    from atlasflow.cli.storage import register as register_storage

    register_storage(sub)
    from atlasflow.cli.vocab import register as register_vocab

    register_vocab(sub)
    from atlasflow.cli.model import register as register_train

    register_train(sub)
    from atlasflow.cli.quant import register as register_quant

    register_quant(sub)
    from atlasflow.cli.report import register as register_report

    register_report(sub)
    from atlasflow.cli.dataset import register as register_dataset

    register_dataset(sub)
    docs = csub.add_parser("docs", help="print the configuration reference as Markdown (docs/configuration.md)")
    docs.set_defaults(func=cmd_config_docs)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = out or sys.stdout
    try:
        return args.func(args, out)
    except ManifestError as exc:
        for line in exc.lines():
            _err(line)
        _err(f"{len(exc.problems)} problem(s); the manifest was not used.")
        return EXIT_INVALID
    except ConfigError as exc:
        where = f"{exc.source}: " if exc.source else ""
        for problem in exc.problems:
            _err(f"config error: {where}{problem}")
        return EXIT_INVALID
    except KeyboardInterrupt:  # `storage --watch` ends with Ctrl-C
        return 0
    except ValueError as exc:  # e.g. an unreadable saved plan; the message names the file
        _err(f"error: {exc}")
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
