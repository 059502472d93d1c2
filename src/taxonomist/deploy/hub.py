"""Sharing models on the Hugging Face Hub: the folder `export --format hf` writes, the `hf-hub:ORG/NAME[@REVISION]`
names that predict, evaluate, serve and export accept (`resolve_model_source`), and `push`.

A Hub folder is a checkpoint under fixed names — `model.safetensors` and its `model.json` load through the same
loader and checks as any checkpoint — plus `config.json` (the card data), `taxonomy.csv` and `README.md` (the model
card). What comes from the Hub is untrusted data: only those files are downloaded, none is unpickled, and a
backbone that names code still needs `--trust-code`. `huggingface_hub` is imported only when the Hub is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taxonomist.deploy.hub_card import CONFIG_FILE, read_card_config
from taxonomist.errors import ConfigError, DownloadError, ModelError

if TYPE_CHECKING:
    from taxonomist.deploy.hub_card import CardOptions
    from taxonomist.deploy.summary import ExportSummary

HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"             # models.checkpoint.metadata_path(WEIGHTS_FILE)
OOD_FILE = "model.ood.safetensors"       # inference.model_file.ood_path(WEIGHTS_FILE)
TAXONOMY_FILE = "taxonomy.csv"
CARD_FILE = "README.md"
#: every file of a Hub folder: what push uploads, and nothing else
HUB_FILES = (WEIGHTS_FILE, METADATA_FILE, OOD_FILE, CONFIG_FILE, TAXONOMY_FILE, CARD_FILE)
#: what loading needs; the only files downloaded from a repository
LOAD_FILES = (WEIGHTS_FILE, METADATA_FILE, OOD_FILE, CONFIG_FILE)

# the Hub's repository names (huggingface_hub.utils.validate_repo_id), each part of ORG/NAME
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# a branch, tag, `refs/pr/N` or commit: git's ref-name rules, kept to characters safe in a URL and a cache path
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


@dataclass(frozen=True)
class HubSpec:
    """A model on the Hub: `hf-hub:ORG/NAME[@REVISION]`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_spec(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def parse_hub_spec(spec: str) -> HubSpec:
    """`hf-hub:ORG/NAME[@REVISION]` → HubSpec; a ConfigError naming the spec when it is malformed.

    >>> parse_hub_spec("hf-hub:fathomnet/fgvc-2025@v1")
    HubSpec(repo_id='fathomnet/fgvc-2025', revision='v1')
    >>> parse_hub_spec("hf-hub:fgvc-2025")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    taxonomist.errors.ConfigError: hf-hub:fgvc-2025: expected hf-hub:ORG/NAME[@REVISION] (the repository's owner, ...)
    """
    if not is_hub_spec(spec):
        raise ConfigError(f"{spec}: not a Hub model name (expected hf-hub:ORG/NAME[@REVISION])")
    repo_id, at, revision = spec[len(HUB_PREFIX):].partition("@")
    check_repo_id(repo_id, where=spec)
    if at:
        check_revision(revision, where=spec)
    return HubSpec(repo_id, revision if at else None)


def check_repo_id(repo_id: str, where: str | None = None) -> str:
    """ORG/NAME as the Hub allows it, else a ConfigError naming `where` (default: the repo id)."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{where or repo_id}: expected hf-hub:ORG/NAME[@REVISION] (the repository's owner, a slash, "
                          "its name)" if where else f"{repo_id!r}: expected ORG/NAME (the repository's owner, a "
                          "slash, its name)")
    for part in parts:
        if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part or part.endswith((".", ".git")):
            raise ConfigError(f"{where or repo_id}: {part!r} is not a valid Hub name (letters, digits, '-', '_' and "
                              "'.', starting with a letter or digit, no '--' or '..', at most 96 characters)")
    return repo_id


def check_revision(revision: str, where: str | None = None) -> str:
    """A branch, tag or commit name, else a ConfigError: it ends up in a URL and in a path of the cache."""
    if not _REVISION.fullmatch(revision or "") or ".." in revision or "//" in revision \
            or revision.endswith(("/", ".", ".lock")):
        raise ConfigError(f"{where or revision}: revision {revision!r} is not a branch, tag or commit name (letters, "
                          "digits, '.', '_', '-' and '/', no '..')")
    return revision


def is_hub_folder(path: str | Path) -> bool:
    """A local folder in the Hub layout (an export, or a downloaded snapshot): `model.safetensors` inside, and not a
    run directory."""
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS_FILE).is_file() and not (p / "checkpoints" / "best.safetensors").is_file()


def is_hub_source(spec: str | Path) -> bool:
    """True for a model that `resolve_model_source` takes from the Hub or from a Hub-layout folder."""
    return is_hub_spec(spec) or is_hub_folder(spec)


def resolve_model_source(spec: str | Path) -> Path:
    """Where a model argument of predict, evaluate, serve and export points: `hf-hub:ORG/NAME[@REVISION]` is
    downloaded into the Hugging Face cache (or found there; `HF_HUB_OFFLINE=1` never goes online) and, like a local
    Hub-layout folder, gives its `model.safetensors`; any other path is returned as it is (a checkpoint, a run
    directory, an .onnx file), for the model loaders to check.

    >>> resolve_model_source("runs/first")
    PosixPath('runs/first')
    """
    if is_hub_spec(spec):
        hub = parse_hub_spec(str(spec))
        return _hub_weights(download_hub_model(hub), str(hub))
    path = Path(spec)
    return _hub_weights(path, str(path)) if is_hub_folder(path) else path


def _hub_weights(folder: Path, where: str) -> Path:
    """The folder's model.safetensors, after checking that the metadata names nothing outside the folder."""
    weights, meta_file = folder / WEIGHTS_FILE, folder / METADATA_FILE
    if not weights.is_file() or not meta_file.is_file():
        missing = WEIGHTS_FILE if not weights.is_file() else METADATA_FILE
        raise ModelError(f"{where}: not a taxonomist model (no {missing}; `taxonomist export RUN --format hf --out "
                         "DIR` writes one)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise ModelError(f"{where}: corrupt {METADATA_FILE}") from None
    ood = meta.get("ood") if isinstance(meta, dict) else None
    if isinstance(ood, dict) and "file" in ood:
        name = ood["file"]
        # the statistics are read from beside the weights by this name: it may not lead out of the folder
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ModelError(f"{where}: {METADATA_FILE} names OOD statistics outside its folder ({str(name)[:80]!r})")
    return weights


def download_hub_model(spec: HubSpec) -> Path:
    """The snapshot folder of `spec` in the Hugging Face cache (`snapshot_download`), holding `LOAD_FILES` only.

    Honours `HF_HUB_OFFLINE`, `HF_HUB_CACHE`/`HF_HOME` and the stored token. Every failure is one line naming the
    spec: malformed, unknown repository or revision, not in the cache while offline, an incomplete snapshot."""
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from taxonomist import __version__

    where = str(spec)
    try:
        with _progress_on_terminals_only():
            # config.json and model.json first: a repository that is not a taxonomist model is refused before its
        # weights are fetched
            folder = Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=[CONFIG_FILE,
                                            METADATA_FILE], library_name="taxonomist", library_version=__version__))
            if not (folder / METADATA_FILE).is_file():
                raise ModelError(f"{where}: not a taxonomist model (the repository has no {METADATA_FILE}; "
                                 "`taxonomist export RUN --format hf` writes one)")
            folder = Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=list(LOAD_FILES),
                                            library_name="taxonomist", library_version=__version__))
    except RevisionNotFoundError:
        raise ModelError(f"{where}: no revision {spec.revision!r} in the repository {spec.repo_id}") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{where}: no such model repository on the Hub, or it is private or gated (log in with "
                         "`hf auth login` or set HF_TOKEN for a private one)") from None
    except getattr(errors, "IncompleteSnapshotError", ()):  # huggingface_hub ≥ 2 checks a cached snapshot
        raise ModelError(f"{where}: the cached copy in {constants.HF_HUB_CACHE} is incomplete and the Hub cannot be "
                         "reached; download it again online") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached")
        raise ModelError(f"{where}: not in the local cache ({constants.HF_HUB_CACHE}) and {why}; download it once "
                         "online (or point HF_HUB_CACHE at a cache that holds it)") from None
    except HFValidationError as e:
        raise ConfigError(f"{where}: {_first_line(e)}") from None
    except Exception as e:  # the Hub's HTTP errors ("the Hub answered …") and the network's, else a bug
        cause = _transfer_failure(e)
        if cause is None:
            raise
        raise DownloadError(f"{where}: {cause}") from None
    return folder


# ------------------------------------------------------------------------------------------------------ export
def export_hub_folder(checkpoint: str | Path, out: str | Path, options: CardOptions | None = None) -> ExportSummary:
    """Write the Hub folder of a checkpoint (or a run directory's best checkpoint) to `out`: the weights copied
    byte for byte as `model.safetensors`, its metadata as `model.json` (OOD statistics renamed with it), and
    `config.json`, `taxonomy.csv`, `README.md` from `taxonomist.deploy.hub_card`.

    The folder is written beside `out` and renamed into place; an earlier export at `out` is replaced, any other
    non-empty folder refused. The copy passes the loader's checks (labels, taxonomy and backbone in the safetensors
    header against model.json) before it replaces anything. No model is built, so no code is imported even for a
    backbone that names some. Returns an `ExportSummary`."""
    from taxonomist.deploy.hub_card import CardOptions, card_config, evaluation_for_card, render_card
    from taxonomist.deploy.summary import ExportSummary
    from taxonomist.taxonomy.io import write_taxonomy
    from taxonomist.models.checkpoint import read_card, resolve_checkpoint

    start = time.time()
    options = options or CardOptions()
    options.check()
    if options.repo_id is not None:
        check_repo_id(options.repo_id)
    source = resolve_model_source(checkpoint)
    ckpt = resolve_checkpoint(source)
    out = Path(out)
    _check_out(out, ckpt)
    card = read_card(ckpt)
    taxonomy = _checked_taxonomy(ckpt)

    stored = card
    ood_src = None
    if card.ood is not None:
        from taxonomist.inference.model_file import ood_path

        name = str(card.ood.file or ood_path(ckpt).name)
        ood_src = ckpt.parent / name
        if Path(name).name != name or not ood_src.is_file():
            raise ModelError(f"{ood_src}: OOD statistics named in the checkpoint metadata are missing")
        stored = stored.replace(ood=dataclasses.replace(card.ood, file=OOD_FILE))
    model_config = dict(card.model_config)
    pretrained = str(model_config.get("pretrained", "none"))
    if pretrained not in ("auto", "none", ""):
        model_config["pretrained"] = Path(pretrained).name  # a local path says nothing to others and is private
        stored = stored.replace(model_config=model_config)
    files = {"weights": WEIGHTS_FILE, "metadata": METADATA_FILE, "ood": OOD_FILE if ood_src else None,
             "taxonomy": TAXONOMY_FILE, "config": CONFIG_FILE, "card": CARD_FILE}
    evaluation = evaluation_for_card(ckpt, card)

    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(ckpt, staging / WEIGHTS_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(stored.to_dict(), indent=1) + "\n", encoding="utf-8")
        if ood_src is not None:
            shutil.copyfile(ood_src, staging / OOD_FILE)
        write_taxonomy(taxonomy, staging / TAXONOMY_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(card_config(stored, taxonomy, evaluation, options, files),
                                                      indent=1) + "\n", encoding="utf-8")
        (staging / CARD_FILE).write_text(render_card(stored, taxonomy, evaluation, options, files), encoding="utf-8")
        _checked_taxonomy(staging / WEIGHTS_FILE)  # what others will load
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    notes = [f"model card {out / CARD_FILE}" + ("" if evaluation else " (no evaluation recorded)"),
             f"push it with: taxonomist push {out} {options.repo_id or 'ORG/NAME'}"]
    if not options.license:
        notes.append("no licence stated in the card (give --license ID, e.g. apache-2.0 or cc-by-4.0)")
    return ExportSummary(out=out, fmt="hf", checkpoint=ckpt, exporter="safetensors copy", size_bytes=size,
                         seconds=time.time() - start, ood_file=out / OOD_FILE if ood_src else None,
                         max_abs_diff=None, notes=tuple(notes))


def _checked_taxonomy(ckpt: Path):
    """The checkpoint's taxonomy, after the loader's consistency checks of its card against the weights."""
    from taxonomist.models.checkpoint import check_metadata, read_card, read_metadata

    taxonomy = read_card(ckpt).taxonomy
    check_metadata(ckpt, read_metadata(ckpt), taxonomy)
    return taxonomy


def _check_out(out: Path, ckpt: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the hf format writes a folder")
    if ckpt.absolute().is_relative_to(out.absolute()) or ckpt.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--out {out} holds the model being exported ({ckpt}); choose a new folder")
    if out.is_dir() and any(out.iterdir()) and read_card_config(out / CONFIG_FILE) is None:
        raise ConfigError(f"--out {out} is not empty and not an earlier Hub export; choose a new or empty folder")


def _replace_folder(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an existing `out` is set aside first and removed after (a kill in between leaves
    it as .NAME.old-PID beside the new folder)."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------- push
@dataclass
class PushSummary:
    """What `push_folder` uploaded."""

    folder: Path
    repo_id: str
    revision: str | None
    files: list[str]
    commit_url: str
    private: bool

    def summary(self) -> str:
        spec = HubSpec(self.repo_id, self.revision)
        return (f"pushed {len(self.files)} files of {self.folder} to {self.repo_id}"
                f"{f' (branch {self.revision})' if self.revision else ''}{' (private)' if self.private else ''}: "
                f"{self.commit_url}\npredict with: taxonomist predict {spec} --images photos/ --out predictions.csv")


def check_export_folder(folder: str | Path) -> dict[str, Any]:
    """A folder that `export --format hf` wrote (model.safetensors, model.json, README.md and taxonomist's
    config.json), else a ConfigError in one line; returns its config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder; push takes the folder that `taxonomist export MODEL --format hf "
                          "--out DIR` wrote")
    missing = [name for name in (WEIGHTS_FILE, METADATA_FILE, CARD_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    config = read_card_config(folder / CONFIG_FILE)
    if missing or config is None:
        what = f"no {', '.join(missing)}" if missing else f"{CONFIG_FILE} is not taxonomist's"
        raise ConfigError(f"{folder}: not a Hub export folder ({what}); write one with `taxonomist export MODEL "
                          "--format hf --out DIR`")
    return config


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None) -> PushSummary:
    """Upload an export folder to the model repository `repo_id` (created when missing, `exist_ok`): its `HUB_FILES`
    in one commit (`HfApi.create_commit`), on `revision` (a branch, created from main when missing). Credentials
    are huggingface_hub's (HF_TOKEN, or the token `hf auth login` stored); without any, a ConfigError saying how to
    log in.

    A card exported for another repository (`export --repo-id`) is refused, so that the card's commands name the
    repository they are in; an OOD file left on the Hub by an earlier push is deleted when the folder has none."""
    folder = Path(folder)
    config = check_export_folder(folder)
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision, where="--revision")
    named = config.get("repo_id")
    if named and named != repo_id:
        raise ConfigError(f"{folder}: its model card names {named} (export --repo-id); pushing it to {repo_id} would "
                          f"publish commands for the wrong repository; export again with --repo-id {repo_id}")

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import HFValidationError

    from taxonomist import __version__

    if not get_token():
        raise ConfigError("push needs Hugging Face credentials: run `hf auth login` (or set HF_TOKEN) with a token "
                          "that can write to " + repo_id.split("/")[0])
    files = [name for name in HUB_FILES if (folder / name).is_file()]
    api = HfApi(library_name="taxonomist", library_version=__version__)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    try:
        with _progress_on_terminals_only():
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
            if OOD_FILE not in files and OOD_FILE in api.list_repo_files(repo_id, repo_type="model", revision=revision):
                operations.append(CommitOperationDelete(path_in_repo=OOD_FILE))  # an earlier model's statistics
            # one commit (not upload_folder, which may split a large folder into several): the weights and the
            # metadata that belongs to them never appear on the Hub one without the other
            info = api.create_commit(
                repo_id, operations, repo_type="model", revision=revision,
                commit_message=commit_message or f"Upload taxonomist model ({config.get('model_name') or repo_id})")
    except HFValidationError as e:
        raise ConfigError(f"{repo_id}: {_first_line(e)}") from None
    except ValueError as e:  # README metadata the Hub refuses (`Invalid metadata in README.md`)
        raise ConfigError(f"push to {repo_id}: {_first_line(e)}") from None
    except Exception as e:  # the Hub's HTTP errors ("the Hub answered …") and the network's, else a bug
        cause = _transfer_failure(e)
        if cause is None:
            raise
        raise DownloadError(f"push to {repo_id}: {cause}") from None
    return PushSummary(folder, repo_id, revision, files, str(getattr(info, "commit_url", info)), private)


@contextlib.contextmanager
def _progress_on_terminals_only():
    """huggingface_hub's progress bars, only when stderr is a terminal (as predict's): a log keeps its lines."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _transfer_failure(error: BaseException) -> str | None:
    """What went wrong, in a few words, when `error` is the network's or the Hub's (huggingface_hub wraps a failed
    upload in a RuntimeError); None for anything else, which stays a bug."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen = error
    for _ in range(4):
        if isinstance(seen, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set; unset it to reach the Hub"
        if isinstance(seen, HfHubHTTPError):
            return f"the Hub answered {_first_line(seen)}"
        if isinstance(seen, OSError) or type(seen).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
            return f"the Hub cannot be reached ({type(seen).__name__}: {_first_line(seen)})"
        if seen.__cause__ is None:
            return None
        seen = seen.__cause__
    return None


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split("\n")[:2]).strip()
    return text[:300] or type(error).__name__
