"""`qwen2-jax dpo`: Direct Preference Optimization on preference JSONL."""

from __future__ import annotations

import argparse

from qwen2_jax.commands.common import MESH_HELP
from qwen2_jax.commands.training import TRAIN_FIELDS, TRAIN_OUTPUT, add_train_args, run_training

NAME = "dpo"
DPO_FIELDS = ("max_prompt_len", "loss", "beta", "label_smoothing", "rpo_alpha", "ref_model",
              "precompute_ref", "reference_free")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="Direct Preference Optimization on preference JSONL",
        description="DPO as trl 1.16's DPOTrainer computes it. Data: JSONL lines {\"prompt\", "
        "\"chosen\", \"rejected\"} as strings (EOS appended) or message lists (chat template), "
        "or {\"chosen\", \"rejected\"} alone with the prompt shared by both. Only completion "
        "tokens are scored; chosen and rejected go through one forward. The reference is a "
        "frozen copy of --ref-model (default: --model) sharded like the policy, or with "
        "--precompute-ref a pass before training that stores its log-probs (it then leaves "
        "memory). Logs OUT/metrics.jsonl (step, loss, rewards/chosen, rewards/rejected, "
        "rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, nll_loss with "
        "--rpo-alpha, lr, grad_norm, tokens_per_s, and eval_* at each save with --eval-data). "
        + TRAIN_OUTPUT,
        epilog=MESH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, "preference pairs", 1024, 1e-6)
    group = parser.add_argument_group("DPO")
    group.add_argument("--max-prompt-len", type=int, default=None, metavar="N",
                       help="keep only the last N prompt tokens (counted); default: no limit "
                       "beyond --max-len")
    group.add_argument("--loss", choices=("sigmoid", "robust", "hinge", "ipo"),
                       default="sigmoid", help="DPO loss (default sigmoid)")
    group.add_argument("--beta", type=float, default=0.1,
                       help="deviation from the reference: higher stays closer (default 0.1)")
    group.add_argument("--label-smoothing", type=float, default=0.0, metavar="E",
                       help="probability that a label is flipped, in [0, 0.5): conservative "
                       "DPO with sigmoid, robust DPO with robust (default 0)")
    group.add_argument("--rpo-alpha", type=float, default=None, metavar="ALPHA",
                       help="add ALPHA times the mean NLL of the chosen completions (RPO)")
    group.add_argument("--ref-model", metavar="PATH", default=None,
                       help="reference model folder (default: --model)")
    group.add_argument("--precompute-ref", action="store_true",
                       help="compute the reference log-probs once before training, so the "
                       "reference is not in memory while training")
    group.add_argument("--reference-free", action="store_true",
                       help="no reference: its log-probs are taken as 0")


def run(args: argparse.Namespace) -> int:
    from qwen2_jax.train.dpo import DPOArgs, run

    return run_training(args, DPOArgs, run, (*TRAIN_FIELDS, *DPO_FIELDS))
