"""`taxonomist push`: upload a folder that `export --format hf` wrote to a model repository on the Hugging Face Hub
(`taxonomist.deploy.hub.push_folder`)."""
from __future__ import annotations

EXAMPLE = """\
examples:
  taxonomist export runs/first --format hf --out hub/first --repo-id my-lab/plankton --license cc-by-4.0
  taxonomist push hub/first my-lab/plankton
  taxonomist push hub/first my-lab/plankton --private --revision v2 --commit-message "retrained on 2025 data"
  taxonomist predict hf-hub:my-lab/plankton@v2 --images photos/ --out p.csv

The repository is created when missing (public unless --private) and the folder's files go up in one commit:
model.safetensors, model.json, model.ood.safetensors, config.json, taxonomy.csv and README.md (the model card),
nothing else. --revision pushes to a branch, created from main when missing. A card exported for another
repository (export --repo-id) is refused, so that its commands name the repository they are in.

Credentials are huggingface_hub's: HF_TOKEN, or the token that `hf auth login` stored; the token needs write
access to ORG. HF_ENDPOINT points at another Hub.
"""


def register(sub, formatter):
    p = sub.add_parser("push", help="upload an `export --format hf` folder to the Hugging Face Hub",
                       description="Upload a Hub folder (from `taxonomist export MODEL --format hf`) to a model "
                                   "repository on the Hugging Face Hub.",
                       epilog=EXAMPLE, formatter_class=formatter)
    p.add_argument("folder", metavar="HF_DIR", help="the folder `taxonomist export MODEL --format hf --out DIR` wrote")
    p.add_argument("repo_id", metavar="ORG/NAME", help="the model repository (a user or organisation, a slash, a name)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its "
                                                          "visibility)")
    p.add_argument("--revision", "--branch", dest="revision", default=None, metavar="BRANCH",
                   help="push to this branch (created from main when missing); default: main")
    p.add_argument("--commit-message", default=None, metavar="TEXT",
                   help="the commit's message (default: Upload taxonomist model (NAME))")
    p.set_defaults(func=run)


def run(args) -> int:
    from taxonomist.deploy.hub import push_folder

    summary = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message)
    print(summary.summary())
    return 0
