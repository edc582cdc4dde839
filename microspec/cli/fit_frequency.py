"""`microspec fit-frequency`: count token ids over corpora into a table; export or convert token maps.

Why a command: the static policy and the in-context core both start from a frequency ranking of the target's
tokenizer over some text, and peers ship that ranking as id-list files (FR-Spec/SGLang `.pt`, vLLM
`draft_token_map`). Counting once into a table and cutting any top-N from it keeps the two in step.
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Count token ids over text/jsonl corpora with the target's tokenizer and save a frequency table
(safetensors: `counts` [V] int64 + metadata), which `StaticFrequencyPolicy.from_file` and
`microspec coverage --token-map` read. Or import any supported token map (--import) instead of counting.
Either way --export writes the top-N ids (EOS forced in, as FR-Spec does) in a peer format chosen by suffix:
  .pt / .pth    1-D int64 tensor, most frequent first (FR-Spec freq_<N>.pt, SGLang --speculative-token-map;
                loadable with torch.load(weights_only=True))
  .json         a JSON list of ids (vLLM draft_token_map)
  .txt          one id per line (vLLM draft_token_map)
  .safetensors  `token_ids` int64 [N]
"""

EPILOG = """\
corpora: shared dataset names (their responses are counted) or files (.txt lines, .jsonl/.json with
--field, default the first of text/output/answer/response/completion/canonical_solution/content), maybe .gz.
Keep fitting and evaluation text apart: the project's split fits on
  alpaca:gpt4_1106_preview alpaca:text_davinci_003 gsm8k:train

examples:
  microspec fit-frequency alpaca:gpt4_1106_preview alpaca:text_davinci_003 gsm8k:train \\
      --tokenizer ../shared/data/tokenizers/llama3 --out llama3_freq.safetensors \\
      --export freq_32768.pt --top 32768
  microspec fit-frequency --import freq_32768.pt --export freq_32768.json --top 32768 \\
      --tokenizer ../shared/data/tokenizers/llama3          # convert FR-Spec .pt -> vLLM .json
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fit-frequency", help="count token frequencies; export/convert token maps",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpora", nargs="*", metavar="CORPUS", help="dataset names or files to count over")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer file or directory (required for counting; with --import, checks the ids)")
    p.add_argument("--tokenizer-kind", choices=("hf", "tiktoken", "sentencepiece"),
                   help="skip format sniffing")
    p.add_argument("--field", metavar="FIELD", help="JSON field holding the text in corpus files")
    p.add_argument("--out", metavar="FILE.safetensors", help="write the table here")
    p.add_argument("--import", dest="import_path", metavar="FILE",
                   help="read a token map (.pt/.pth, .json, .txt, .safetensors counts/ids/d2t) instead of "
                        "counting")
    p.add_argument("--export", metavar="FILE",
                   help="write the top --top ids (.pt, .json, .txt, .safetensors)")
    p.add_argument("--top", type=int, metavar="N",
                   help="how many ids --export writes (default: all ranked ids)")
    p.add_argument("--no-eos", action="store_true", help="do not force the tokenizer's EOS ids into --export")
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars (off anyway when stderr is not a terminal)")
    p.set_defaults(func=run)
    return p


def _check(args) -> None:
    if args.import_path and args.corpora:
        raise ValueError("give either CORPUS... (count) or --import FILE (convert), not both")
    if not args.import_path and not args.corpora:
        raise ValueError("nothing to do: give CORPUS... to count, or --import FILE")
    if args.corpora and not args.tokenizer:
        raise ValueError("counting needs --tokenizer")
    if not (args.out or args.export):
        raise ValueError("give --out FILE.safetensors and/or --export FILE")
    if args.top is not None and not args.export:
        raise ValueError("--top applies to --export")
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    # Output paths and the imported map are checked now, not after minutes of counting.
    from pathlib import Path

    from microspec.lab.frequency import EXPORT_SUFFIXES
    from microspec.policies import load_token_map
    outputs = (("--out", args.out, (".safetensors",)), ("--export", args.export, EXPORT_SUFFIXES))
    for flag, path, suffixes in outputs:
        if path is None:
            continue
        if Path(path).suffix.lower() not in suffixes:
            raise ValueError(f"{flag} {path}: the format must be one of {', '.join(suffixes)}")
        if not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{flag} {path}: its folder does not exist")
    if args.import_path:
        load_token_map(args.import_path)     # one-line error for a corrupt, empty, pickled or non-integer map


def run(args) -> int:
    from tqdm import tqdm

    from microspec.lab.data import load_tokenizer
    from microspec.lab.frequency import count_corpora, export_top, import_token_map, save_table

    _check(args)
    tok = load_tokenizer(args.tokenizer, kind=args.tokenizer_kind) if args.tokenizer else None
    if args.import_path:
        table = import_token_map(args.import_path, tok.vocab_size if tok else None)
        if tok is not None:
            table.meta.update(tokenizer=tok.name, vocab_size=tok.vocab_size, eos_ids=tok.eos_ids)
        print(f"imported {args.import_path}: {table.ranked().numel()} ranked ids", file=sys.stderr)
    else:
        with tqdm(unit="text", disable=True if args.no_progress else None, file=sys.stderr) as bar:
            table = count_corpora(args.corpora, tok, args.field, progress=bar)
        m = table.meta
        print(f"{m['num_tokens']} tokens, {m['distinct_ids']} distinct ids of {m['vocab_size']} "
              f"({tok.name})", file=sys.stderr)
    if args.out:
        save_table(table, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.export:
        ranked = table.ranked()
        eos = [] if args.no_eos else (tok.eos_ids if tok else table.meta.get("eos_ids", []))
        n = args.top or ranked.numel()
        if n > ranked.numel():
            print(f"WARNING: --top {n} but only {ranked.numel()} ids ever occurred; exporting those",
                  file=sys.stderr)
        ids = export_top(ranked, args.export, n, eos)
        print(f"wrote {args.export}: {ids.numel()} ids (EOS {eos if eos else 'not'} forced in)",
              file=sys.stderr)
    return 0
