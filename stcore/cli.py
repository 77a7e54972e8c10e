"""The ``stcore`` command line.

::

    stcore list [--task TASK]                       every registered method, by task
    stcore show METHOD                              a method's description and options
    stcore run METHOD INPUT.h5ad -o OUTPUT.h5ad [--reference REF.h5ad] [--option VALUE ...]
    stcore bench TASK [--methods a,b] [--seeds 0,1,2] [--datasets d1,d2] [--options K=V,...] [--out DIR]
    stcore datasets                                 the datasets shipped in data/

Method options are the keyword arguments of the method's class, spelled with dashes:
``--n-domains 7``, ``--cell-type-key subclass``, ``--refine`` (a bare flag means True), ``--genes A,B,C``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

__all__ = ["main", "parse_method_options"]


def _convert(value: str, param: inspect.Parameter):
    """Turn a command-line string into the type the option's default/annotation asks for."""
    annotation = str(param.annotation)
    default = param.default
    text = value.strip()
    if text.lower() == "none" and (default is None or "None" in annotation):
        return None
    if isinstance(default, bool) or annotation.startswith("bool"):
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"--{param.name.replace('_', '-')} expects true/false, got {value!r}.")
    if "list" in annotation or "tuple" in annotation or isinstance(default, (list, tuple)):
        items = [t.strip() for t in text.split(",") if t.strip()]
        inner = annotation.split("[", 1)[1] if "[" in annotation else ""
        if inner.startswith("int"):
            return [int(t) for t in items]
        if inner.startswith("float"):
            return [float(t) for t in items]
        return items
    for kind in (int, float):
        if isinstance(default, kind) and not isinstance(default, bool) or annotation.startswith(kind.__name__):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"--{param.name.replace('_', '-')} expects {kind.__name__}, got {value!r}.") from None
    return text


def parse_method_options(cls, args: list[str]) -> dict:
    """``["--n-domains", "7", "--refine"]`` -> ``{"n_domains": 7, "refine": True}``, checked against ``cls``."""
    from .methods import method_options

    params = method_options(cls)
    options: dict = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ValueError(f"Unexpected argument {token!r}; method options look like --name value.")
        name, _, inline = token[2:].partition("=")
        key = name.replace("-", "_")
        if key not in params:
            known = ", ".join("--" + k.replace("_", "-") for k in params) or "none"
            raise ValueError(f"{cls.name} has no option --{name}. Its options: {known}.")
        if inline:
            raw, i = inline, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw, i = args[i + 1], i + 2
        else:
            raw, i = "true", i + 1
        options[key] = _convert(raw, params[key])
    return options


def _read(path: str):
    import anndata as ad

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if p.suffix != ".h5ad":
        raise ValueError(f"{path}: expected an AnnData .h5ad file (write one with adata.write_h5ad).")
    return ad.read_h5ad(p)


def _cmd_list(args) -> int:
    from .methods import TASKS, available

    table = available(args.task)
    for task, group in table.groupby("task", sort=False):
        print(f"{task}: {TASKS[task]}")
        for _, row in group.iterrows():
            flags = "".join([" [image]" if row.image else "", " [reference]" if row.reference else ""])
            print(f"  {row.method:<14} {row.summary}{flags}")
    return 0


def _cmd_show(args) -> int:
    from .methods import get_method, method_options

    cls = get_method(args.method)
    print(f"{cls.name} ({cls.task}): {cls.summary}")
    if cls.paper:
        print(f"paper: {cls.paper}")
    print()
    print(inspect.cleandoc(cls.__doc__ or ""))
    print("\noptions:")
    for name, p in method_options(cls).items():
        default = "" if p.default is inspect.Parameter.empty else f" (default: {p.default!r})"
        print(f"  --{name.replace('_', '-')}{default}")
    return 0


def _cmd_run(args, extra: list[str]) -> int:
    from .methods import get_method

    cls = get_method(args.method)
    options = parse_method_options(cls, extra)
    adata = _read(args.input)
    reference = _read(args.reference) if args.reference else None
    if cls.needs_reference and reference is None:
        raise ValueError(f"{cls.name} needs a single-cell reference: add --reference REF.h5ad.")
    start = time.perf_counter()
    result = cls(**options).run(adata, reference)
    elapsed = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.write_h5ad(out, compression="gzip")
    print(f"{cls.name}: done in {elapsed:.1f} s; wrote {out}")
    return 0


def _parse_options(text: str) -> dict:
    """``"histology=false,b=49"`` -> ``{"histology": False, "b": 49}``."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise ValueError(f"--options {text!r}: write each option as key=value, separated by commas.")
        key, value = item.split("=", 1)
        low = value.strip().lower()
        if low in ("true", "false"):
            out[key.strip()] = low == "true"
            continue
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key.strip()] = value
    return out


def _cmd_bench(args) -> int:
    from . import bench

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    methods = args.methods.split(",") if args.methods else None
    datasets = args.datasets.split(",") if args.datasets else None
    variants = [_parse_options(o) for o in args.options] if args.options else None
    table = bench.run(args.task, methods=methods, seeds=seeds, datasets=datasets, options=variants, out_dir=args.out)
    print(bench.format_table(table))
    return 0


def _cmd_datasets(args) -> int:
    from . import data

    print(data.list_datasets().to_string(index=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stcore", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered methods")
    p.add_argument("--task", default=None)
    p = sub.add_parser("show", help="describe one method and its options")
    p.add_argument("method")
    p = sub.add_parser("run", help="run a method on an AnnData file",
                       epilog="Any further --option value pairs are passed to the method (see `stcore show`).")
    p.add_argument("method")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--reference", default=None, help="single-cell reference .h5ad (deconv, impute, locate)")
    p = sub.add_parser("bench", help="benchmark every method of a task")
    p.add_argument("task")
    p.add_argument("--methods", default=None, help="comma-separated subset")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2; 0 in FAST mode)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets (default: the task's)")
    p.add_argument("--options", action="append", default=None, metavar="K=V,...",
                   help="method options, e.g. histology=false; repeat for several variants ('' = defaults)")
    p.add_argument("--out", default="results", help="folder for the leaderboard files")
    sub.add_parser("datasets", help="list the shipped datasets")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "show":
            return _cmd_show(args)
        if args.command == "run":
            return _cmd_run(args, extra)
        if args.command == "bench":
            return _cmd_bench(args)
        return _cmd_datasets(args)
    except (KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"stcore {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
