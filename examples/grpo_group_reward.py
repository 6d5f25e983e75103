"""Fine-tune an LLM with GRPO to answer survey questions as a group would.

The reward is the trained group predictor (inference.GroupReward, docs/inference.md): the answers
sampled for one prompt, as a distribution, are scored against the group's predicted distribution
(`--mode option` scores each answer alone, which pushes toward one answer for everyone). Prompts
are the Alpaca prompt the predictor's embeddings were built from, so the model answers with a
letter. Needs TRL (`pip install trl`) and a causal LM.

    python examples/grpo_group_reward.py --run runs/opinionqa_fedavg_50 --group Democrat \\
        --model Qwen/Qwen2.5-0.5B-Instruct --steps 50 --output_dir runs/grpo_democrat
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_loaders.prompts import question_prompt  # noqa: E402
from data_loaders.schema import DataError  # noqa: E402
from inference import GroupPredictor, GroupReward  # noqa: E402
from inference.items import read_context_file, read_questions_file  # noqa: E402
from inference.predict import group_evaluation  # noqa: E402
from utils.errors import UserError, exit_on_error  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (or exported predictor folder with --context)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--group", help="a group of the run's dataset: its evaluation context is the reward's context")
    src.add_argument("--context", help="the group's answers, JSONL (docs/inference.md)")
    p.add_argument("--questions", help="training questions, JSONL (default with --group: the run's scored questions)")
    p.add_argument("--model", required=True, help="causal LM to fine-tune: hub id or local folder")
    p.add_argument("--mode", default="distribution", choices=("distribution", "option"),
                   help="distribution (default): score each prompt's answers as a distribution against the "
                        "group's; option: score each answer alone (its optimum is one answer for everyone)")
    p.add_argument("--steps", type=int, default=10, help="GRPO steps")
    p.add_argument("--num_generations", type=int, default=4, help="answers sampled per prompt")
    p.add_argument("--batch_size", type=int, default=4, help="completions per device step (a multiple of the above)")
    p.add_argument("--max_completion_length", type=int, default=16, help="tokens per answer")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    p.add_argument("--output_dir", default="runs/grpo_group_reward", help="where TRL writes checkpoints")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    return p.parse_args(argv)


def questions_and_context(pred: GroupPredictor, args):
    if args.group:
        context, scored = group_evaluation(pred, args.group)
        return (read_questions_file(args.questions) if args.questions else scored), context
    if not args.questions:
        raise DataError("--context needs --questions (the training questions)", "add --questions new.jsonl")
    return read_questions_file(args.questions), read_context_file(args.context)


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_on_error(lambda: train(args))


def train(args) -> None:
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise UserError(f"this example needs TRL ({exc.name} is not installed)", "pip install trl") from None
    pred = GroupPredictor.load(args.run, use_run_data=True if args.group else "auto")
    questions, context = questions_and_context(pred, args)
    rows = [{"prompt": question_prompt(q.text, list(q.options), pred.embedder.style), "question": q.text,
             "options": list(q.options)} for q in questions]
    reward = GroupReward(pred, context, mode=args.mode)
    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.steps, num_generations=args.num_generations,
                        per_device_train_batch_size=args.batch_size, max_completion_length=args.max_completion_length,
                        learning_rate=args.lr, logging_steps=1, report_to=[], use_cpu=args.cpu, save_strategy="no")
    trainer = GRPOTrainer(model=args.model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(args.output_dir)
    logged = [h["rewards/group_reward/mean"] for h in trainer.state.log_history if "rewards/group_reward/mean" in h]
    print(f"{len(rows)} training questions, {len(context)} context answers; mean group reward per step: "
          + ", ".join(f"{r:.4f}" for r in logged))


if __name__ == "__main__":
    sys.exit(main())
