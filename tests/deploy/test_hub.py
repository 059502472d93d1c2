"""Sharing models on the Hugging Face Hub, offline: `export --format hf` writes a folder the checkpoint loader reads,
with a model card the Hub can render; `push` uploads it through huggingface_hub; `hf-hub:ORG/NAME[@REVISION]` is
downloaded into a cache laid out by huggingface_hub itself and predicts, with HF_HUB_OFFLINE=1, exactly what the
checkpoint predicts. The Hub is a fake one behind huggingface_hub's own HTTP client (`set_client_factory` with a
mock transport): our code runs unpatched, and nothing reaches huggingface.co.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest

from taxonomist.cli.main import main
from taxonomist.deploy.hub import (CARD_FILE, CONFIG_FILE, HUB_FILES, LOAD_FILES, METADATA_FILE, OOD_FILE,
                                   TAXONOMY_FILE, WEIGHTS_FILE, HubSpec, parse_hub_spec, resolve_model_source)
from taxonomist.errors import ConfigError, ModelError

TOKEN = "hf_test_write_token"
# huggingface_hub's LFS upload passes a file object as `data=`, which its HTTP client deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'")


# ---------------------------------------------------------------------------------------------- the fake Hub
class FakeHub:
    """The Hub endpoints huggingface_hub calls to create a repo and a branch, commit (regular files inline, LFS
    files through the batch API and a PUT), and to download (repo info, tree, HEAD/GET resolve). Repositories live
    in memory; every request is recorded; an endpoint it does not know fails the test."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id → {"private", "branches": {name: sha}, "commits": {sha: files}}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[str] = []
        self.commit_messages: list[str] = []

    # -- helpers for tests
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["branches"][revision]]

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = {"private": False, "branches": {}, "commits": {}}
        self._commit(repo_id, "main", files)

    def _commit(self, repo_id: str, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(c).hexdigest()) for p, c in files.items()))
                           .encode() + branch.encode() + str(len(self.commit_messages)).encode()).hexdigest()
        self.repos[repo_id]["commits"][sha] = dict(files)
        self.repos[repo_id]["branches"][branch] = sha
        return sha

    # -- HTTP
    def handle(self, request, mod):
        method, path = request.method, unquote(request.url.raw_path.decode().split("?")[0])
        self.requests.append((method, path))
        json_ = lambda data, status=200, headers=None: mod.Response(status, json=data, headers=headers)  # noqa: E731
        # LFS objects go to a presigned storage URL, without the token
        writes = method in ("POST", "PUT") and path != "/api/validate-yaml" and not path.startswith("/fake-lfs/")
        auth = request.headers.get("authorization")
        if (writes or auth is not None) and auth != f"Bearer {TOKEN}":
            return json_({"error": "Invalid credentials in Authorization header"}, 401)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:   # repo info without a revision: main's
            parts += ["revision", "main"]
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}"
            url = f"https://huggingface.co/{repo_id}"
            if repo_id in self.repos:
                return json_({"error": "You already created this model repo", "url": url}, 409)
            self.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self.repos[repo_id]["private"] = body.get("visibility") == "private" or bool(body.get("private"))
            return json_({"url": url, "name": repo_id})
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent lookup, best effort: none here
            return json_({"error": "not here"}, 404)
        if path == "/api/validate-yaml":
            return json_({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo_id not in self.repos:
                return json_({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            repo = self.repos[repo_id]
            if action == "branch" and method == "POST":
                if rest in repo["branches"]:
                    return json_({"error": "Reference already exists"}, 409)
                repo["branches"][rest] = repo["branches"]["main"]
                return json_({})
            if rest not in repo["branches"] and rest not in repo["commits"]:
                return json_({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
            sha = repo["branches"].get(rest, rest)
            files = repo["commits"][sha]
            if action == "preupload":
                listed = json.loads(request.content)["files"]
                return json_({"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors")
                                         else "regular", "shouldIgnore": False} for f in listed]})
            if action == "commit":
                return self._receive_commit(repo_id, rest, request.content, json_)
            if action == "revision":
                return json_({"id": repo_id, "sha": sha, "private": repo["private"],
                              "siblings": [{"rfilename": p} for p in files]})
            if action == "tree":
                return json_([self._entry(p, c) for p, c in sorted(files.items())])
        if len(parts) >= 2 and parts[-1] == "batch" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return json_({"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"https://huggingface.co/fake-lfs/{o['oid']}"}}} for o in objects]})
        if parts[0] == "fake-lfs" and method == "PUT":
            self.lfs[parts[1]] = request.read()
            return mod.Response(200)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, name = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            repo = self.repos.get(repo_id)
            if repo is None:
                return json_({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            sha = repo["branches"].get(revision, revision)
            content = repo["commits"].get(sha, {}).get(name)
            if content is None:
                return json_({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            entry = self._entry(name, content)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            headers = {"X-Repo-Commit": sha, "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content)),
                       "ETag": f'"{etag}"'}
            return mod.Response(200, headers=headers, content=b"" if method == "HEAD" else content)
        self.unknown.append(f"{method} {path}")
        return json_({"error": f"fake Hub: no endpoint {method} {path}"}, 400)

    def _receive_commit(self, repo_id, branch, payload, json_):
        files = dict(self.files(repo_id, branch))
        for line in payload.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                self.commit_messages.append(value["summary"])
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                files[value["path"]] = self.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(value["path"])
        sha = self._commit(repo_id, branch, files)
        return json_({"commitUrl": f"https://huggingface.co/{repo_id}/commit/{sha}", "commitOid": sha})

    @staticmethod
    def _entry(path: str, content: bytes) -> dict:
        blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        entry = {"type": "file", "path": path, "size": len(content), "oid": blob}
        if path.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return entry


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub as huggingface_hub's HTTP layer, a write token in HF_TOKEN, an empty cache in tmp_path/cache."""
    from huggingface_hub import close_session, constants, get_session, set_client_factory

    fake = FakeHub()
    close_session()
    base = get_session()  # huggingface_hub's default client: keep its event hooks (offline mode, request ids)
    client_cls, hooks = type(base), base.event_hooks
    httpx_module = sys.modules[client_cls.__module__.split(".")[0]]
    transport = httpx_module.MockTransport(lambda request: fake.handle(request, httpx_module))
    set_client_factory(lambda: client_cls(transport=transport, event_hooks=hooks, follow_redirects=True))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # hf_xet would upload outside the HTTP layer
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield fake
    set_client_factory(lambda: client_cls(event_hooks=hooks, follow_redirects=True, timeout=None))
    assert fake.unknown == []


# ------------------------------------------------------------------------------------------ a model to share
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny calibrated run (OOD statistics), evaluated on its test split: (run directory, dataset)."""
    from taxonomist.config import load_config
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.evaluate.run import evaluate_run
    from taxonomist.inference import calibrate_run
    from taxonomist.train import train

    base = tmp_path_factory.mktemp("hub")
    data, run_dir = base / "plankton-synth", base / "run"
    synthesize(data, n_taxa=5, per_class=6, image_size=32, seed=4)
    split_dataset(data, val=0.2, test=0.3, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={run_dir}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false",
                             "augment.randaugment=", "train.seed=0"])
    train(cfg, progress=False, log=lambda *_: None)
    calibrate_run(run_dir, device="cpu", num_workers=0, ood_methods=("energy", "mahalanobis"))
    evaluate_run(run_dir, device="cpu", num_workers=0, progress=False)
    return run_dir, data


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "plankton"
    assert main(["export", str(run[0]), "--format", "hf", "--out", str(out), "--repo-id", "lab/plankton",
                 "--license", "cc-by-4.0"]) == 0
    return out


def _isolated_env(tmp_path: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), **extra}


def _predict_in_subprocess(model: str, images: Path, out: Path, env: dict[str, str], *extra: str):
    return subprocess.run([sys.executable, "-m", "taxonomist.cli.main", "predict", model, "--images", str(images),
                           "--split", "test", "--workers", "0", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)


# ------------------------------------------------------------------------------------------------------ export
def test_export_writes_a_folder_the_checkpoint_loader_reads(run, exported):
    from safetensors import safe_open

    from taxonomist.inference.model_file import load_model
    from taxonomist.train.checkpoint import HEADER_KEY, read_metadata

    ckpt = run[0] / "checkpoints" / "best.safetensors"
    assert sorted(p.name for p in exported.iterdir()) == sorted(HUB_FILES)
    assert (exported / WEIGHTS_FILE).read_bytes() == ckpt.read_bytes()   # same weights, same header metadata
    with safe_open(str(exported / WEIGHTS_FILE), framework="pt") as f:
        assert HEADER_KEY in f.metadata()
    assert (exported / OOD_FILE).read_bytes() == (ckpt.parent / "best.ood.safetensors").read_bytes()
    meta, original = read_metadata(exported / WEIGHTS_FILE), read_metadata(ckpt)
    assert meta["ood"]["file"] == OOD_FILE and meta["labels"] == original["labels"]
    assert {k: v for k, v in meta.items() if k != "ood"} == {k: v for k, v in original.items() if k != "ood"}
    model, loaded, taxonomy = load_model(resolve_model_source(exported))
    assert list(taxonomy.labels) == original["labels"]
    assert (exported / TAXONOMY_FILE).read_text() == (run[0] / "taxonomy.csv").read_text()
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["library_name"] == "taxonomist" and config["repo_id"] == "lab/plankton"
    assert config["labels"] == original["labels"] and config["ood_methods"] == ["energy", "mahalanobis"]
    metrics = json.loads((run[0] / "metrics.json").read_text())
    assert config["evaluation"]["split"] == "test" and config["evaluation"]["source"] == "evaluate"
    assert config["evaluation"]["values"]["mhd"] == pytest.approx(metrics["mhd"])
    assert config["evaluation"]["dataset"] == "plankton-synth"   # the folder's name, never the local path
    assert str(run[1]) not in (exported / CONFIG_FILE).read_text() + (exported / CARD_FILE).read_text()


def test_card_renders_with_the_yaml_header_the_hub_reads(run, exported):
    from huggingface_hub import ModelCard

    markdown_it = pytest.importorskip("markdown_it")
    text = (exported / CARD_FILE).read_text()
    assert text.startswith("---\n")
    card = ModelCard.load(exported / CARD_FILE)
    data = card.data
    assert data.library_name == "taxonomist" and data.pipeline_tag == "image-classification"
    assert data.license == "cc-by-4.0"
    assert {"image-classification", "taxonomy"} <= set(data.tags)
    assert data.metrics == ["accuracy", "f1", "mhd"]
    metrics = json.loads((run[0] / "metrics.json").read_text())
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == round(metrics["top1"], 4)
    assert results["mhd"].metric_value == round(metrics["mhd"], 4)
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert {r.task_type for r in data.eval_results} == {"image-classification"}
    assert data.model_name == "plankton"

    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card.text)
    for heading in ("Use", "Evaluation", "Taxonomy", "Intended use and limits", "Files", "Trust", "Licence"):
        assert f"<h2>{heading}</h2>" in html
    assert html.count("<table>") >= 4   # metrics, per rank, labels, files
    assert "taxonomist predict hf-hub:lab/plankton --images photos/ --out predictions.csv" in html
    assert f"{metrics['top1']:.4f}" in html and "<strong>test</strong> split" in html
    for label in json.loads((exported / CONFIG_FILE).read_text())["labels"]:
        assert label in html


def test_card_escapes_names_and_says_when_metrics_or_licence_are_missing(tmp_path):
    from huggingface_hub import ModelCard

    from taxonomist.card import ModelCard as TaxonomistCard
    from taxonomist.card import taxonomy_to_json
    from taxonomist.deploy.hub_card import CardEvaluation, CardOptions, render_card
    from taxonomist.taxonomy import Taxonomy

    taxonomy = Taxonomy.from_parents({"Animalia": None, "<script>x</script>": "Animalia", "a|b": "Animalia"},
                                     labels=["<script>x</script>", "a|b"])
    meta = TaxonomistCard(labels=taxonomy.labels, taxonomy_json=taxonomy_to_json(taxonomy), image_size=224,
                          model_config={"backbone": "resnet18"}, backbone="resnet18")
    files = {"weights": WEIGHTS_FILE, "metadata": METADATA_FILE, "ood": None, "taxonomy": TAXONOMY_FILE,
             "config": CONFIG_FILE, "card": CARD_FILE}
    text = render_card(meta, taxonomy, None, CardOptions(), files)
    card = ModelCard(text)
    assert card.data.license is None and card.data.eval_results is None
    assert "<script>" not in card.text and "&lt;script&gt;" in card.text and "a\\|b" in card.text
    assert "hf-hub:ORG/NAME" in card.text and "No evaluation was recorded" in card.text
    assert "## Licence\n\nNot stated" in card.text
    val = CardEvaluation(split="val", source="training", values={"top1": 0.5}, epoch=3)
    text = render_card(meta, taxonomy, val, CardOptions(repo_id="lab/x", license="mit"), files)
    assert "optimistic" in text and "epoch 3" in text and "license: mit" in text


def test_export_refuses_a_foreign_folder_and_replaces_an_earlier_export(run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(run[0]), "--format", "hf", "--out", str(busy)]) == 2
    assert "not empty and not an earlier Hub export" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"

    out = tmp_path / "hub"
    assert main(["export", str(run[0]), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["repo_id"] is None
    assert main(["export", str(run[0]), "--format", "hf", "--out", str(out), "--repo-id", "lab/again"]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["repo_id"] == "lab/again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hub"]   # nothing left beside it
    capsys.readouterr()
    assert main(["export", str(out), "--format", "hf", "--out", str(out)]) == 2
    assert "holds the model being exported" in capsys.readouterr().err
    assert main(["export", str(run[0]), "--format", "hf", "--out", str(tmp_path / "x"), "--license", "CC BY"]) == 2
    assert "--license 'CC BY'" in capsys.readouterr().err
    assert main(["export", str(run[0]), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--repo-id", "lab/x"]) == 2
    assert "need --format hf" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------- push
def test_push_uploads_the_folder_in_one_commit(exported, hub, capsys):
    assert main(["push", str(exported), "lab/plankton", "--private", "--revision", "v2",
                 "--commit-message", "first model"]) == 0
    out = capsys.readouterr().out
    assert "pushed 6 files" in out and "taxonomist predict hf-hub:lab/plankton@v2" in out
    repo = hub.repos["lab/plankton"]
    assert repo["private"] is True and set(repo["branches"]) == {"main", "v2"}
    assert hub.commit_messages == ["first model"]
    assert hub.files("lab/plankton", "v2") == {".gitattributes": hub.files("lab/plankton")[".gitattributes"],
                                               **{n: (exported / n).read_bytes() for n in HUB_FILES}}
    assert hub.files("lab/plankton") == {".gitattributes": hub.files("lab/plankton")[".gitattributes"]}
    assert ("PUT", f"/fake-lfs/{hashlib.sha256((exported / WEIGHTS_FILE).read_bytes()).hexdigest()}") \
        in hub.requests  # the weights went through LFS, like any safetensors file on the Hub


def test_push_without_credentials_is_one_line_and_sends_nothing(exported, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(exported), "lab/plankton"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: push needs Hugging Face credentials")
    assert "hf auth login" in err and "HF_TOKEN" in err
    assert hub.requests == []


def test_push_refusals(exported, run, hub, monkeypatch, capsys, tmp_path):
    assert main(["push", str(run[0]), "lab/plankton"]) == 2
    assert "not a Hub export folder (no model.safetensors" in capsys.readouterr().err
    assert main(["push", str(exported), "lab/other"]) == 2
    assert "its model card names lab/plankton" in capsys.readouterr().err
    assert main(["push", str(exported), "plankton"]) == 2
    assert "expected ORG/NAME" in capsys.readouterr().err
    assert hub.requests == []
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["push", str(exported), "lab/plankton"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: push to lab/plankton: the Hub answered") and "401" in err


def test_a_repush_without_ood_statistics_removes_the_old_ones(exported, hub, tmp_path):
    import shutil

    from taxonomist.deploy.hub import push_folder

    push_folder(exported, "lab/plankton")
    assert OOD_FILE in hub.files("lab/plankton")
    plain = tmp_path / "plain"
    shutil.copytree(exported, plain)
    (plain / OOD_FILE).unlink()
    push_folder(plain, "lab/plankton", commit_message="no OOD")
    assert OOD_FILE not in hub.files("lab/plankton") and WEIGHTS_FILE in hub.files("lab/plankton")


# ------------------------------------------------------------------------------------------------------- load
def test_round_trip_predicts_offline_exactly_as_the_checkpoint(run, exported, hub, tmp_path):
    """export → push → download into a cache that huggingface_hub lays out → predict with HF_HUB_OFFLINE=1."""
    run_dir, data = run
    main(["push", str(exported), "lab/plankton"])
    hub.repos["lab/plankton"]["commits"][hub.repos["lab/plankton"]["branches"]["main"]]["payload.py"] = \
        b"open('PWNED', 'w')\n"   # another file in the repository: never downloaded
    weights = resolve_model_source("hf-hub:lab/plankton")
    cache = tmp_path / "cache"
    repo_dir = cache / "models--lab--plankton"
    sha = hub.repos["lab/plankton"]["branches"]["main"]
    assert weights == repo_dir / "snapshots" / sha / WEIGHTS_FILE
    assert (repo_dir / "refs" / "main").read_text() == sha
    assert sorted(p.name for p in weights.parent.iterdir()) == sorted(LOAD_FILES)
    assert all(p.is_symlink() for p in weights.parent.iterdir())          # → ../../blobs/<etag>, as the Hub's cache
    assert weights.resolve().parent == repo_dir / "blobs"
    assert weights.read_bytes() == (run_dir / "checkpoints" / "best.safetensors").read_bytes()
    n_requests = len(hub.requests)

    env = _isolated_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    hub_csv, ckpt_csv = tmp_path / "hub.csv", tmp_path / "checkpoint.csv"
    done = _predict_in_subprocess("hf-hub:lab/plankton", data, hub_csv, env, "--ood", "mahalanobis")
    assert done.returncode == 0, done.stderr
    done = _predict_in_subprocess(str(run_dir), data, ckpt_csv, env, "--ood", "mahalanobis")
    assert done.returncode == 0, done.stderr
    hub_answers, answers = pd.read_csv(hub_csv), pd.read_csv(ckpt_csv)
    assert len(answers) > 0 and "ood_score" in answers
    pd.testing.assert_frame_equal(hub_answers, answers)
    assert hub_csv.read_bytes() == ckpt_csv.read_bytes()
    assert len(hub.requests) == n_requests and not (tmp_path / "PWNED").exists()
    # a pinned revision that the cache knows by its commit works offline too
    done = _predict_in_subprocess(f"hf-hub:lab/plankton@{sha}", data, tmp_path / "pinned.csv", env)
    assert done.returncode == 0, done.stderr


def test_a_local_hub_folder_loads_like_the_checkpoint(run, exported, tmp_path, capsys):
    from taxonomist.inference.model_file import read_card

    weights = resolve_model_source(exported)
    assert weights == exported / WEIGHTS_FILE
    assert resolve_model_source(run[0]) == run[0]   # anything else is left to the loaders
    assert read_card(weights)["labels"] == read_card(run[0])["labels"]
    assert main(["evaluate", str(exported), "--data", str(run[1]), "--out", str(tmp_path / "ev"), "--no-report",
                 "--device", "cpu", "--num-workers", "0"]) == 0
    measured = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert measured["mhd"] == pytest.approx(json.loads((run[0] / "metrics.json").read_text())["mhd"])
    assert sorted(p.name for p in exported.iterdir()) == sorted(HUB_FILES)   # nothing written beside the model


def test_offline_misses_are_one_line_naming_the_spec(exported, hub, monkeypatch, capsys, tmp_path):
    from huggingface_hub import constants

    main(["push", str(exported), "lab/plankton"])
    resolve_model_source("hf-hub:lab/plankton")             # main is now in the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    assert resolve_model_source("hf-hub:lab/plankton").is_file()
    capsys.readouterr()
    for spec in ("hf-hub:lab/unknown", "hf-hub:lab/plankton@v9"):
        assert main(["predict", spec, "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        assert err.startswith(f"error: {spec}: not in the local cache") and "HF_HUB_OFFLINE is set" in err
    assert len(hub.requests) == before   # offline: not one request


def test_online_errors_are_one_line_naming_the_spec(exported, hub, capsys, tmp_path):
    main(["push", str(exported), "lab/plankton"])
    capsys.readouterr()
    hub.add_repo("timm/resnet18", {CONFIG_FILE: b'{"architecture": "resnet18"}', WEIGHTS_FILE: b"x" * 100})
    cases = {"hf-hub:lab/unknown": "no such model repository on the Hub",
             "hf-hub:lab/plankton@v9": "no revision 'v9' in the repository lab/plankton",
             "hf-hub:timm/resnet18": "not a taxonomist model (the repository has no model.json",
             "hf-hub:plankton": "expected hf-hub:ORG/NAME[@REVISION]",
             "hf-hub:lab/plankton@": "revision '' is not a branch, tag or commit name",
             "hf-hub:lab/plankton@../../refs": "is not a branch, tag or commit name",
             "hf-hub:lab/x--y": "is not a valid Hub name"}
    for spec, words in cases.items():
        for command in (["predict", spec, "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")],
                        ["evaluate", spec, "--data", str(tmp_path), "--out", str(tmp_path / "ev")],
                        ["export", spec, "--format", "hf", "--out", str(tmp_path / "again")]):
            assert main(command) == 2, (command, spec)
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and err.startswith(f"error: {spec}: ") and words in err, (command, err)
    assert ("GET", f"/timm/resnet18/resolve/{hub.repos['timm/resnet18']['branches']['main']}/{WEIGHTS_FILE}") \
        not in hub.requests   # refused before its weights were fetched


def test_evaluate_needs_out_for_a_hub_model(exported, run, capsys):
    assert main(["evaluate", str(exported), "--data", str(run[1])]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert not (exported / "metrics.json").exists()


def test_a_hub_model_that_names_code_needs_trust_code(run, hub, tmp_path, monkeypatch, capsys):
    """A repository whose model.json (and weights header) name a `module:` backbone: refused without
    --trust-code, and the module it names is never imported."""
    import shutil

    from taxonomist.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint

    ckpt = run[0] / "checkpoints" / "best.safetensors"
    model, _, _ = load_checkpoint(ckpt)
    meta = read_metadata(ckpt)
    payload = "hub_payload_never_imported"
    meta = {**meta, "backbone": f"module:{payload}:make", "ood": None,
            "model_config": {**meta["model_config"], "backbone": f"module:{payload}:make"}}
    meta.pop("format_version")
    folder = tmp_path / "forged"
    folder.mkdir()
    save_checkpoint(folder / WEIGHTS_FILE, model, meta)
    shutil.copyfile(run[0] / "taxonomy.csv", folder / TAXONOMY_FILE)
    (folder / CARD_FILE).write_text("---\nlibrary_name: taxonomist\n---\n# forged\n")
    (folder / CONFIG_FILE).write_text(json.dumps({"library_name": "taxonomist"}))
    (tmp_path / f"{payload}.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["push", str(folder), "lab/forged"]) == 0
    capsys.readouterr()
    assert main(["predict", "hf-hub:lab/forged", "--images", str(run[1]), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert f"names code to import (backbone module:{payload}:make); pass --trust-code" in err
    assert payload not in sys.modules


def test_parse_hub_spec_and_hub_folders(tmp_path):
    import re

    assert parse_hub_spec("hf-hub:lab/plankton") == HubSpec("lab/plankton", None)
    assert parse_hub_spec("hf-hub:lab/plankton@refs/pr/3") == HubSpec("lab/plankton", "refs/pr/3")
    assert str(HubSpec("lab/plankton", "v2")) == "hf-hub:lab/plankton@v2"
    for bad in ("hf-hub:", "hf-hub:/x", "hf-hub:a/b/c", "hf-hub:a/b@x y", "hf-hub:a/.b", "hf-hub:a/b@v1.lock",
                "hf-hub:a/b@-x", "hf-hub:a/b@x//y"):
        with pytest.raises(ConfigError, match=re.escape(bad)):
            parse_hub_spec(bad)
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ModelError, match="not a taxonomist model \\(no model.json"):
        resolve_model_source(folder)
    (folder / METADATA_FILE).write_text(json.dumps({"ood": {"file": "../../elsewhere.safetensors"}}))
    with pytest.raises(ModelError, match="names OOD statistics outside its folder"):
        resolve_model_source(folder)
