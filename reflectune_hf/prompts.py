"""Every prompt and template of the project, in one place.

Strings quoted from the published method are byte-identical to it, typos included
("Analyse", "relevent", the missing space before "3."): they are method parameters, and
results are only comparable with the papers' when they are unchanged. The `"clean"` prompt set
fixes the typos for users who prefer that; `"paper"` is the default.

Sections: the instruction+input join (`join_input`, one named separator per use), reflection (instruction compression, instruction and response reflection), scoring
templates for IFD/r-IFD, SelectIT rating lines, the pairwise judge.

Example:
    >>> from reflectune_hf.prompts import get_prompt_set
    >>> get_prompt_set("paper").instruction_system
    'You are a helpful, precise but picky assistant for checking the quality of a given instruction.'
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

# ---------------------------------------------------------------------------------------------
# The instruction+input join: one function, the separator each use needs named
# ---------------------------------------------------------------------------------------------

BLANK_LINE_SEPARATOR = "\n\n"  # a merged instruction (`merge_input`), Tuna's bare prompt, a test question
NEWLINE_SEPARATOR = "\n"  # the WizardLM and plain scoring templates, the quality report's instruction text
VICUNA_INPUT_SEPARATOR = "\nInput:\n"  # the Vicuna scoring template and the SFT user turn
NO_SEPARATOR = ""  # the reference IFD script's instruction text (`instruction + input`, REFERENCE.md §6)


def join_input(instruction: str, input: Optional[str], separator: str = BLANK_LINE_SEPARATOR,
               skip_blank: bool = False) -> str:
    """The instruction, `separator`, then the input; the instruction alone when the input is
    empty or None (or, with `skip_blank=True`, only white space). Nothing is stripped.

    Example:
        >>> from reflectune_hf.prompts import VICUNA_INPUT_SEPARATOR, join_input
        >>> join_input("Sort:", "3, 1, 2"), join_input("Add.", "2+2", VICUNA_INPUT_SEPARATOR), join_input("Hi.", "")
        ('Sort:\\n\\n3, 1, 2', 'Add.\\nInput:\\n2+2', 'Hi.')
    """
    if not input or (skip_blank and not input.strip()):
        return instruction
    return f"{instruction}{separator}{input}"


def merge_input(instruction: str, input: str) -> str:
    """The deterministic, lossless merge of an instruction and its input: the instruction, a blank
    line, the input, each stripped at the join (the instruction alone when the input is blank,
    the input alone when the instruction is).

    Example:
        >>> from reflectune_hf.prompts import merge_input
        >>> merge_input("Translate to French.", "Good morning")
        'Translate to French.\\n\\nGood morning'
    """
    if not input.strip():
        return instruction
    if not instruction.strip():
        return input.strip()
    return join_input(instruction.rstrip(), input.strip())

# ---------------------------------------------------------------------------------------------
# Reflection (REFERENCE.md §2-§4)
# ---------------------------------------------------------------------------------------------

INSTRUCTION_SYSTEM = "You are a helpful, precise but picky assistant for checking the quality of a given instruction."
RESPONSE_SYSTEM = "You are a helpful, precise but picky assistant for checking the quality of the answer to a given instruction."
RESPONSE_INPUT_SYSTEM = (
    "You are a helpful and precise assistant for checking the quality of the answer to a given instruction and its input."
)

PAIR_TEMPLATE = "[Instruction]\n{ins}\n\n[The Start of Answer]\n{outp}\n\n[The End of Answer]\n\n[System]\n{criteria}\n\n"
PAIR_INPUT_TEMPLATE = (
    "[Instruction]\n{ins}\n\n[The Start of Input]\n{inp}\n\n[The End of Input]\n\n"
    "[The Start of Answer]\n{outp}\n\n[The End of Answer]\n\n[System]\n{criteria}\n\n"
)

CRITERIA_INS = (
    "We would like you to answer several questions related to the quality of a given instruction. \n"
    + "1. Why this instruction is not good? First analyse the instruction based on Complexity of the Topic, Level of Detail Required, Knowledge Required, Ambiguity of the Instruction and Logical Reasoning or Problem-Solving Involved. \n"
    + "Then analyse why this answer is not good for the given instruction? Analyse based on the Helpfulness, Relevance, Accuracy and Level of Details. \n"
    + "Finally analyse why this bad instruction lead to a bad answer. "
    + "2. Based on the reason you provided, generate a new and complete instruction which is complex and difficult to answer directly. "
    + "Make sure the new instruction is relevent but independent to the original instruction, which can be answered without knowing the original instruction, put the new instruction in the format of [New Instruction] your instruction [End]"
    + "3. Answer the newly generated instruction as detailed as possible, in the format of [New Answer] your answer [End] \n"
)

CRITERIA_RES = (
    "We would like you to answer several questions related to the quality of the answer to the given instruction. \n"
    + "1. Why this answer is not good for the given instruction? Analyse based on the Helpfulness, Relevance, Accuracy and Level of Details. \n"
    + "2. Based on the reason you provided, generate a better answer, new and complete, as detailed as possible, in the format of [Better Answer] your answer [End] \n"
)

CRITERIA_RES_INPUT = (
    "We would like you to answer several questions related to the quality of the answer to the given instruction and corresponding input. \n"
    + "1. Why this answer is not good for the given instruction and corresponding input? Analyse based on the Helpfulness, Relevance, Accuracy and Level of Details. \n"
    + "2. Based on the reason you provided, generate a better answer, new and complete, as detailed as possible, in the format of [Better Answer] your answer [End] \n"
)

# Instruction compression was never published (REFERENCE.md §2): this prompt is ours.
COMPRESS_SYSTEM = "You are a careful editor of instruction-tuning data."
COMPRESS_TEMPLATE = (
    "[Instruction]\n{ins}\n\n[The Start of Input]\n{inp}\n\n[The End of Input]\n\n[System]\n"
    "Rewrite the instruction and its input above as one new, self-contained instruction. "
    "Keep every piece of information from the input that is needed to answer (quote text, data or code "
    "from the input verbatim), do not answer the instruction, and do not add requirements. "
    "Put the new instruction in the format of [New Instruction] your instruction [End]\n\n"
)


@dataclass(frozen=True)
class PromptSet:
    """The reflection prompts of one prompt set (`"paper"` or `"clean"`)."""

    name: str
    instruction_system: str = INSTRUCTION_SYSTEM
    instruction_template: str = PAIR_TEMPLATE
    instruction_criteria: str = CRITERIA_INS
    response_system: str = RESPONSE_SYSTEM
    response_template: str = PAIR_TEMPLATE
    response_criteria: str = CRITERIA_RES
    response_input_system: str = RESPONSE_INPUT_SYSTEM
    response_input_template: str = PAIR_INPUT_TEMPLATE
    response_input_criteria: str = CRITERIA_RES_INPUT
    compress_system: str = COMPRESS_SYSTEM
    compress_template: str = COMPRESS_TEMPLATE

    def instruction_messages(self, instruction: str, output: str) -> list[dict]:
        """Chat messages of instruction reflection (REFERENCE.md §3)."""
        user = self.instruction_template.format(ins=instruction, outp=output, criteria=self.instruction_criteria)
        return [{"role": "system", "content": self.instruction_system}, {"role": "user", "content": user}]

    def response_messages(self, instruction: str, output: str, input: str = "") -> list[dict]:
        """Chat messages of response reflection, with or without input (REFERENCE.md §4)."""
        if input:
            user = self.response_input_template.format(
                ins=instruction, inp=input, outp=output, criteria=self.response_input_criteria
            )
            return [{"role": "system", "content": self.response_input_system}, {"role": "user", "content": user}]
        user = self.response_template.format(ins=instruction, outp=output, criteria=self.response_criteria)
        return [{"role": "system", "content": self.response_system}, {"role": "user", "content": user}]

    def compress_messages(self, instruction: str, input: str) -> list[dict]:
        """Chat messages of instruction compression (our prompt; REFERENCE.md §2)."""
        user = self.compress_template.format(ins=instruction, inp=input)
        return [{"role": "system", "content": self.compress_system}, {"role": "user", "content": user}]


def _clean(text: str) -> str:
    return (
        text.replace("relevent", "relevant")
        .replace("this bad instruction lead to", "this bad instruction leads to")
        .replace("[End]3. Answer", "[End] \n3. Answer")
    )


PROMPT_SETS: dict[str, PromptSet] = {
    "paper": PromptSet(name="paper"),
    "clean": replace(
        PromptSet(name="clean"),
        instruction_criteria=_clean(CRITERIA_INS),
    ),
}


def get_prompt_set(name: str = "paper") -> PromptSet:
    """The prompt set called `name`: `"paper"` (byte-identical to the method) or `"clean"`."""
    if name not in PROMPT_SETS:
        raise ValueError(f"Unknown prompt set {name!r}; choose one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name]


# ---------------------------------------------------------------------------------------------
# Scoring templates for IFD / r-IFD (REFERENCE.md §6)
# ---------------------------------------------------------------------------------------------

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ScoringTemplate:
    """A prompt template for scoring. `no_input` holds `{instruction}`; with an input, either the
    instruction and input joined by `input_separator` (`join_input`) fill `no_input`, or, for a
    template with a form of its own (Alpaca), `with_input` holds `{instruction}` and `{input}`."""

    name: str
    no_input: str
    input_separator: str = NEWLINE_SEPARATOR
    with_input: Optional[str] = None

    def format(self, instruction: str, input: str = "") -> str:
        if input and self.with_input is not None:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=join_input(instruction, input, self.input_separator))


SCORING_TEMPLATES: dict[str, ScoringTemplate] = {
    "vicuna": ScoringTemplate(
        "vicuna", no_input=VICUNA_SYSTEM + " USER: {instruction} ASSISTANT:", input_separator=VICUNA_INPUT_SEPARATOR
    ),
    "alpaca": ScoringTemplate(
        "alpaca",
        no_input=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:"
        ),
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
        ),
    ),
    "wizardlm": ScoringTemplate("wizardlm", no_input="{instruction}\n\n### Response:"),
    # Superfiltering's plain form: for base models that know no chat template (an unfamiliar
    # template pushes IFD above 1 for most rows).
    "plain": ScoringTemplate("plain", no_input="{instruction}\n"),
}


def get_scoring_template(name: str = "vicuna") -> ScoringTemplate:
    """The scoring template called `name`: vicuna (default), alpaca, wizardlm or plain."""
    if name not in SCORING_TEMPLATES:
        raise ValueError(f"Unknown scoring template {name!r}; choose one of {sorted(SCORING_TEMPLATES)}")
    return SCORING_TEMPLATES[name]


def reverse_prompt(output: str) -> str:
    """The r-IFD reverse instruction: asks to guess the instruction of a given response."""
    return (
        "Below is the response to an instruction, please guess the corresponding instruction for the given response.\n"
        + output
        + "\nGenerate the instruction for the above response."
    )


# ---------------------------------------------------------------------------------------------
# SelectIT rating lines (REFERENCE.md §9)
# ---------------------------------------------------------------------------------------------

SELECTIT_RATING_LINES: tuple[str, ...] = (
    "Assign a score from 1 to 5 to each assistant based on how accurately they follow the instructions and response provided, ensuring the score is represented clearly on its own.",
    "Score each assistant on a scale from one to five, reflecting the accuracy of their adherence to the instructions and input, and present this score plainly without the need for extra details.",
    "Rate each assistant's response accuracy to the given task and input on a scale of 1 to 5, with 5 being the most precise; the score should be self-explanatory and presented as a single line.",
    "Evaluate the assistants by the correctness of their response to the provided directions and response, giving them a rating between 1 and 5\u2014where a 5 indicates top accuracy\u2014and output the score clearly as a standalone line.",
    "Rate each assistant on a scale of 1 to 5 based on their adherence to the instructions and the accuracy of their responses, with the score clearly displayed.",
    "For each assistant, allocate a score between 1 and 5 reflecting how precisely they follow instructions and their response accuracy, making sure the score is distinctly visible.",
    "Score each assistant from one to five, judging by how well they follow the given instructions and the correctness of their replies, and ensure that the score is clearly marked.",
    "Assign to every assistant a score ranging from 1 to 5, evaluating their compliance with instructions and the precision of their feedback, with the score being conspicuously presented.",
    "Provide a score of 1 to 5 for each assistant, considering their fidelity to instructions and the accuracy of their answers, and ensure the score is clearly indicated.",
)


def selectit_prompt(rating_line: str, instruction: str, response: str) -> str:
    """The raw SelectIT rating prompt (no chat template)."""
    return rating_line + "\n" + "Instruction:" + instruction + "\n" + "Response:" + response + "\nThe answer is: \n"


# ---------------------------------------------------------------------------------------------
# Pairwise judge (REFERENCE.md §11)
# ---------------------------------------------------------------------------------------------

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = (
    "[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n[System]\n{criteria}\n\n"
)
JUDGE_CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above.\n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented does not affect your judgment."
)


def judge_messages(question: str, answer_1: str, answer_2: str) -> list[dict]:
    """Chat messages of the pairwise judge for one order of the two answers."""
    user = JUDGE_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2, criteria=JUDGE_CRITERIA)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------
# Tuna contextual ranking (REFERENCE.md §10)
# ---------------------------------------------------------------------------------------------

TUNA_RANKING_SYSTEM = "You are a professional and experienced data annotator."

# Byte-identical to the published prompt for 4 responses (missing spaces after "responses." and
# "steps.", the "[i, j ,k, l, m]" spacing). `{listed}` is "0/1/2/3", `{reference}` the index of
# the judge's own response (4), `{compared}` "0/1/2/3/4"; other response counts fill them in.
TUNA_RANKING_CRITERIA = (
    "\n\nWe would like you to rate Response {listed} in reply to the given instruction displayed above.\n"
    "First, identify if the instruction requires open-ended or close-ended responses."
    "Second, you need to generate one high quality '###Response {reference}' in answer to the instruction. "
    "It needs to have the same format as other responses and will be used as a reference later.\n"
    "Third, identify if there are duplicate responses and keep only one of the duplicate responses for the "
    "following steps."
    "Fourth, compare Response {reference} with Response {compared} and assign each response an overall score on a "
    "scale of 0 to 15 where a higher score indicates better overall quality. For an open-ended instruction, please "
    "rate based on the relevance (score 0 to 5), level of details/justification: (score 0 to 5) and accuracy "
    "(score 0 to 5) of each response; for a close-ended instruction, please rate based on the accuracy (score 0 to "
    "5), level of details/justification (score 0 to 5) and clarity (score 0 to 5) of each response. The ratings "
    "should have the format: 'Response k: [sum of the 3 individual scores you give to response k]'.\n"
    "Last, rank the responses in decreasing order of their overall scores. The ranking should have the format: "
    "'rank: [i, j ,k, l, m]'. If there are duplicate responses, keep only one of them in the rank, that is, the "
    "ranking may become: 'rank: [i, j, k, l]', 'rank: [i, j, k]' 'rank: [i, j]' or even 'rank: [i]'.\n"
)


def tuna_ranking_prompt(prompt: str, responses) -> str:
    """The user message of Tuna's contextual ranking: the formatted instruction (the reference
    passes the Alpaca-template prompt), the numbered responses, then the ranking criteria.

    The judge's own reference response gets the next index (4 for 4 responses).

    Example:
        >>> from reflectune_hf.prompts import tuna_ranking_prompt
        >>> text = tuna_ranking_prompt("Name a colour.", ["Red.", "Blue."])
        >>> text.startswith("Name a colour.\\n\\n###Response 0:\\nRed.\\n\\n###Response 1:\\nBlue.\\n\\n\\nWe would")
        True
    """
    responses = list(responses)
    numbered = "\n".join(f"###Response {j}:\n{r}\n" for j, r in enumerate(responses))
    indices = [str(j) for j in range(len(responses))]
    criteria = TUNA_RANKING_CRITERIA.format(
        listed="/".join(indices), reference=len(responses), compared="/".join(indices + [str(len(responses))])
    )
    return prompt + "\n\n" + numbered + criteria


def tuna_ranking_messages(prompt: str, responses) -> list[dict]:
    """Chat messages of Tuna's contextual ranking (system and user, REFERENCE.md §10)."""
    return [{"role": "system", "content": TUNA_RANKING_SYSTEM},
            {"role": "user", "content": tuna_ranking_prompt(prompt, responses)}]
