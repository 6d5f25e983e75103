"""The text that is embedded for one (question, option) point (method.md §2): the full prompt of its
question (every option listed, lettered A, B, ...) followed by that point's own answer "<letter>. <option>",
so the answer at the end is what tells a question's options apart. Two styles: alpaca (Alpaca-7B and
MiniLM) and llama2 (Llama-2-13B-chat's chat format, the instruction as the system prompt). The tokenizer
adds Llama's BOS token "<s>", so the text does not hold it (the released GPO code wrote it as well,
giving two, and used a single newline after "<</SYS>>"). Letters go A..Z, AA, AB, ... (spreadsheet
columns), so questions with more than 26 options still get distinct labels.
"""
from __future__ import annotations

from data_loaders.schema import QuestionBank

INSTRUCTION = "Answer the following question by picking ONE of the given options"

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
LLAMA2_TEMPLATE = "[INST] <<SYS>>\n{instruction}\n<</SYS>>\n\n{input} [/INST] "

TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "llama2": LLAMA2_TEMPLATE}


def option_letter(index: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA', 27 -> 'AB', 701 -> 'ZZ', 702 -> 'AAA'."""
    letters = ""
    n = index + 1  # bijective base 26: there is no zero digit
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def answer_text(index: int, option: str) -> str:
    return f"{option_letter(index)}. {option}"


def question_prompt(question: str, options: list[str], style: str = "alpaca") -> str:
    """The prompt shared by all options of one question (ends where the answer starts)."""
    if style not in TEMPLATES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(TEMPLATES)}")
    listed = "".join(f"\n{answer_text(i, opt)}" for i, opt in enumerate(options))
    return TEMPLATES[style].format(instruction=INSTRUCTION, input=f"{question}\n\nOptions:{listed}")


def option_texts(bank: QuestionBank, style: str = "alpaca") -> list[str]:
    """One text per point, in bank order: questions in bank order, options in option order."""
    texts: list[str] = []
    for question, options in zip(bank.questions, bank.options):
        prompt = question_prompt(question, options, style)
        texts += [prompt + answer_text(i, opt) for i, opt in enumerate(options)]
    return texts
