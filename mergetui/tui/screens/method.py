"""Step 3: the method and its parameters, as a form generated from the method registry.

Nothing here is written per method: the fields come from each ``ParamSpec`` (global ones once,
per-model ones once per model), and every change re-validates the whole draft with the same
validator recipes go through, so the reasons shown are the ones ``mergetui run`` would give.

A numeric parameter takes a number or a gradient across the layers (a list, drawn as a curve
beside it), and per-tensor overrides in a second field (see :mod:`mergetui.tui.values`). A recipe
made of ``[[slices]]`` shows its slices read-only (they are edited in the TOML) and its
method-wide parameters, which are every slice source's defaults.

The vocabulary keys (``tokenizer``, ``missing_tokens``, ``pad_to_multiple_of``, ``chat_template``)
have fields of their own; the choices come from :mod:`mergetui.recipe.vocab` and the draft's
models, and what is wrong with a value is the recipe validator's message, shown under them.
``tie_word_embeddings`` and ``[merge.tokens]`` are kept as the recipe gives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec, get_method
from mergetui.recipe.schema import CHAT_TEMPLATE_NAMES, looks_like_template
from mergetui.recipe.vocab import MISSING_TOKEN_RULES, TOKENIZER_CHOICES, model_index
from mergetui.tui import values
from mergetui.tui.screens.base import StepScreen
from mergetui.tui.widgets.recipe_side import recipe_side, save_recipe, save_row

if TYPE_CHECKING:
    from mergetui.tui.state import RecipeDraft

#: the line above the parameters that says how to type gradients and overrides
VALUES_HELP = (
    "numbers: a value, or a gradient across the layers (0, 0.5, 1); overrides: filter=value "
    "(mlp=0.7, self_attn=[0, 1]), the first filter found in a tensor's name winning"
)


#: the line under "vocabulary" that says what its fields are for
VOCABULARY_HELP = "when the models' vocabularies differ (step 2 shows what these do)"
TOKENIZER_LABELS = {"base": "base: the base's", "union": "union: every model's tokens"}
#: the chat template choices that are not a value of their own: a .jinja file typed in the field
#: beside, and Jinja text given in the recipe (kept as it is)
TEMPLATE_FILE = "<a .jinja file>"
TEMPLATE_TEXT = "<the recipe's Jinja text>"
#: the recipe keys the vocabulary fields edit or keep → the field that shows their problems
VOCABULARY_KEYS = {
    "merge.tokenizer": "#vocab-tokenizer",
    "merge.missing_tokens": "#vocab-missing",
    "merge.pad_to_multiple_of": "#vocab-pad",
    "merge.chat_template": "#vocab-template",
    "merge.tie_word_embeddings": "",
    "merge.tokens": "",
}


def _short(reference: str) -> str:
    """A model's last path part (``models/ft-code`` → ``ft-code``), for a choice's label."""
    return reference.rstrip("/").rsplit("/", 1)[-1] or reference


def _vocabulary_key(problem: str) -> str | None:
    """The vocabulary key a validator problem is about (``merge.tokens.'<|x|>': …`` →
    ``merge.tokens``), None for any other."""
    where = problem.split(": ", 1)[0]
    for key in VOCABULARY_KEYS:
        if where == key or where.startswith(key + "."):
            return key
    return None


def template_choice(value: str | None) -> tuple[Any, str]:
    """``(choice, file text)`` for a ``chat_template`` value: a name is its own choice, Jinja
    text is :data:`TEMPLATE_TEXT`, anything else (a path) is :data:`TEMPLATE_FILE` with the path
    in the field beside (where the validator says what is wrong with it)."""
    if value is None:
        return Select.NULL, ""
    if value in CHAT_TEMPLATE_NAMES or value == "base" or model_index(value) is not None:
        return value, ""
    if looks_like_template(value) and not value.endswith(".jinja"):
        return TEMPLATE_TEXT, ""
    return TEMPLATE_FILE, value


def _slice_models(draft: RecipeDraft) -> list[str]:
    """Every model the draft's slices name, in order, once."""
    found: list[str] = []
    for piece in draft.slices:
        sources = piece.get("sources")
        for source in sources if isinstance(sources, list) else []:
            if isinstance(source, dict) and isinstance(source.get("model"), str):
                found.append(source["model"])
    return list(dict.fromkeys(found))


def _with_value(options: list[tuple[str, Any]], value: Any) -> list[tuple[str, Any]]:
    """``options`` plus ``value`` as given when none of them is it (a model reference of a version
    1 recipe, a model no longer chosen, a typo): the field shows what the draft holds, and the
    validator says what is wrong with it."""
    if value is not Select.NULL and value not in [v for _, v in options]:
        options.append((f"{value} (as given)", value))
    return options


def tokenizer_choices(draft: RecipeDraft) -> list[tuple[str, str]]:
    """``merge.tokenizer``'s choices: base, union, each model (by reference in a recipe of slices,
    which has no ``models[i]``)."""
    options = [(TOKENIZER_LABELS.get(name, name), name) for name in TOKENIZER_CHOICES]
    if draft.slices:
        options += [(_short(reference), reference) for reference in _slice_models(draft)]
    else:
        options += [
            (f"models[{i}]: {_short(entry.model)}", f"models[{i}]")
            for i, entry in enumerate(draft.models)
        ]
    return _with_value(options, draft.tokenizer)


def missing_token_choices(draft: RecipeDraft) -> list[tuple[str, str]]:
    return _with_value([(name, name) for name in MISSING_TOKEN_RULES], draft.missing_tokens)


def template_choices(draft: RecipeDraft) -> list[tuple[str, Any]]:
    """``merge.chat_template``'s choices (besides the blank one, the tokenizer model's): base,
    each model, the built-in ones, a .jinja file, and the recipe's Jinja text when it has some."""
    options: list[tuple[str, Any]] = [("base: the base's", "base")] if draft.base else []
    if not draft.slices:
        options += [
            (f"models[{i}]: {_short(entry.model)}'s", f"models[{i}]")
            for i, entry in enumerate(draft.models)
        ]
    options += [
        ("auto: the one most models share", "auto"),
        ("chatml", "chatml"),
        ("llama3", "llama3"),
        ("a .jinja file…", TEMPLATE_FILE),
    ]
    choice, _ = template_choice(draft.chat_template)
    if choice == TEMPLATE_TEXT:
        options.append(("the recipe's Jinja text (kept)", TEMPLATE_TEXT))
    return _with_value(options, choice)


class _Syntax(Validator):
    """Marks a field invalid while its text cannot be read (the note under it says why)."""

    def __init__(self, check: Any) -> None:
        super().__init__()
        self.check = check

    def validate(self, value: str) -> ValidationResult:
        problem = self.check(value)
        return self.failure(problem) if problem else self.success()


class MethodScreen(StepScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+s", "save", "Save recipe", show=True),
        Binding("ctrl+r", "run", "Run merge", show=True),
        Binding("ctrl+n", "run", "Run", show=False),
    ]
    HELP = """\
## 3 · Method

Pick a method; its form comes from the method registry, global parameters first, then each
model's. Every change is validated at once with the same rules `mergetui run` applies: the
reasons show on the right, above a live preview of the recipe TOML.

A number can vary across the layers: type a **gradient**, `0, 0.5, 1` (values spread evenly
over the layers and interpolated between them); its curve shows under the field. The field to
its right takes **overrides** for some tensors: `self_attn=0.3, mlp=[1, 0.5, 0]` gives the
tensors whose name contains `self_attn` 0.3 and the `mlp` ones a gradient; the first filter
found in a tensor's name wins, and the value on the left is the default for the rest.

A recipe made of **[[slices]]** (layer ranges, e.g. opened from a mergekit config) shows its
slices read-only: edit them in the TOML. Its parameters here are the defaults of every slice.

**Vocabulary**, for models whose vocabularies differ (a fine-tune that added chat tokens): the
output's **tokenizer** (`base`, the `union` of every model's tokens, or `models[i]`'s), what a
model that lacks one of its tokens contributes for it (**missing tokens**, its rule described
under the field), the embedding rows rounded **up to a multiple** (e.g. 64; empty: as they are)
and the **chat template** (empty: the one of the model the tokenizer comes from). Step 2 shows
what the setting does before anything runs. `tie_word_embeddings` and `[merge.tokens]` are edited
in the TOML and kept as given.

Then the output folder, the dtype (default: the base's), the device (`auto` takes a GPU when there
is one), the seed (for DARE) and the **memory budget** (`max_memory`, e.g. `4GiB`; empty: 1 GiB):
tensors too large for it are merged in blocks of rows, and step 2 shows how. **LoRA rank**
(`output.lora_rank`) extracts a LoRA adapter of that rank of (merged − base) once the merge is
in place (it needs a base), into **LoRA path** (default `<output>-lora`), as `mergetui lora
extract` does. **Ctrl+S** saves the recipe (and shows the headless command);
**Ctrl+R** runs the merge.

""" + "\n".join(f"- **{m.name}**: {m.summary} {m.when_to_use}" for m in METHODS.values())

    def __init__(self) -> None:
        super().__init__()
        #: field key (``g-t``, ``m0-weight``) → [value text, overrides text], as typed
        self._texts: dict[str, list[str]] = {}
        #: field key → why its text cannot be read (the draft keeps its last readable value)
        self._problems: dict[str, str] = {}
        #: Jinja text the recipe gives as ``chat_template`` (kept while its choice is chosen)
        self._template_text = ""

    def compose(self) -> ComposeResult:
        draft = self.draft
        yield Header()
        with Horizontal(id="method-step"):
            with VerticalScroll(id="method-form"):
                yield Label("3 · Method and parameters")
                yield Select(
                    [
                        (f"{spec.name} — {spec.summary.rstrip('.')}", spec.name)
                        for spec in METHODS.values()
                    ],
                    value=draft.method,
                    allow_blank=False,
                    id="method",
                )
                yield Static("", id="method-help")
                yield Vertical(id="params")
                yield from self._vocabulary_fields()
                yield Label("output", classes="model-title")
                yield Label(
                    "output.path: the folder the merged model is written to", classes="param-help"
                )
                yield Input(draft.output, id="out-path")
                yield Label(
                    "merge.dtype: float32, float16, bfloat16 (default: the base's)",
                    classes="param-help",
                )
                yield Select(
                    [(d, d) for d in ("float32", "float16", "bfloat16")],
                    value=draft.dtype or Select.NULL,
                    prompt="the base's dtype",
                    id="out-dtype",
                )
                yield Label("merge.device: auto, cpu, cuda or cuda:N", classes="param-help")
                yield Input(draft.device, id="out-device")
                yield Label("merge.seed: for the randomised methods (DARE)", classes="param-help")
                yield Input(str(draft.seed), id="out-seed")
                yield Label(
                    "merge.max_memory: the merge's peak memory, e.g. 4GiB (default 1 GiB: larger "
                    "tensors are merged in blocks of rows)",
                    classes="param-help",
                )
                yield Input(draft.max_memory, placeholder="1GiB", id="out-max-memory")
                yield Label(
                    "output.lora_rank: after the merge, extract a LoRA adapter of rank R of "
                    "(merged − base) (empty: none)",
                    classes="param-help",
                )
                yield Input(
                    "" if draft.lora_rank is None else str(draft.lora_rank),
                    placeholder="e.g. 64 (empty: no adapter)",
                    id="out-lora-rank",
                )
                yield Label(
                    "output.lora_path: the adapter's folder (default: <output.path>-lora)",
                    classes="param-help",
                )
                yield Input(draft.lora_path, placeholder="<output.path>-lora", id="out-lora-path")
                yield from save_row(draft.default_save_path())
            yield from recipe_side()
        yield Footer()

    async def on_mount(self) -> None:
        await self._build_fields()

    # -- vocabulary ----------------------------------------------------------------------------
    def _vocabulary_fields(self) -> ComposeResult:
        """The vocabulary keys' fields, showing the draft's values (see ``tokenizer_choices``
        and the others for what each offers)."""
        draft = self.draft
        tokenizers = tokenizer_choices(draft)
        rules = missing_token_choices(draft)
        choice, file_text = template_choice(draft.chat_template)
        templates = template_choices(draft)
        if choice == TEMPLATE_TEXT:
            self._template_text = draft.chat_template or ""
        pad = draft.pad_to_multiple_of
        with Vertical(id="vocabulary"):
            yield Label("vocabulary", classes="model-title")
            yield Static(VOCABULARY_HELP, classes="param-help")
            with Horizontal(classes="row"):
                yield Label("tokenizer", classes="field-label vocab-label")
                yield Select(
                    tokenizers, value=draft.tokenizer, allow_blank=False, id="vocab-tokenizer"
                )
            with Horizontal(classes="row"):
                yield Label("missing tokens", classes="field-label vocab-label")
                yield Select(
                    rules, value=draft.missing_tokens, allow_blank=False, id="vocab-missing"
                )
            yield Static(
                self._rule_help(draft.missing_tokens), id="vocab-missing-help", classes="param-help"
            )
            with Horizontal(classes="row"):
                yield Label("pad to multiple", classes="field-label vocab-label")
                yield Input(
                    "" if pad is None else str(pad),
                    placeholder="of N rows, e.g. 64 (empty: no padding)",
                    id="vocab-pad",
                    validate_on=(),  # marked from the recipe validator's problems (_validate)
                )
            with Horizontal(classes="row"):
                yield Label("chat template", classes="field-label vocab-label")
                yield Select(
                    templates, value=choice, prompt="the tokenizer model's", id="vocab-template"
                )
            with Horizontal(classes="row", id="vocab-file-row") as row:
                row.display = choice == TEMPLATE_FILE
                yield Label(".jinja file", classes="field-label vocab-label")
                yield Input(
                    file_text,
                    placeholder="template.jinja (next to the recipe)",
                    id="vocab-template-file",
                    validate_on=(),
                )
            yield Static("", id="vocab-note", classes="field-note")

    @staticmethod
    def _rule_help(rule: str) -> str:
        description = MISSING_TOKEN_RULES.get(rule)
        if description is None:
            return f"{rule}: not a rule; choose one of {', '.join(MISSING_TOKEN_RULES)}"
        return f"a model that lacks an output token gives {description}"

    @on(Select.Changed, "#vocab-tokenizer, #vocab-missing, #vocab-template")
    def vocabulary_chosen(self, event: Select.Changed) -> None:
        draft = self.draft
        value = event.value
        if event.select.id == "vocab-tokenizer":
            draft.tokenizer = str(value)
        elif event.select.id == "vocab-missing":
            draft.missing_tokens = str(value)
            self.query_one("#vocab-missing-help", Static).update(self._rule_help(str(value)))
        else:
            row = self.query_one("#vocab-file-row", Horizontal)
            row.display = value == TEMPLATE_FILE
            if value is Select.NULL:
                draft.chat_template = None
            elif value == TEMPLATE_FILE:
                draft.chat_template = self.query_one("#vocab-template-file", Input).value.strip()
            elif value == TEMPLATE_TEXT:
                draft.chat_template = self._template_text
            else:
                draft.chat_template = str(value)
        self._validate()

    @on(Input.Changed, "#vocab-pad, #vocab-template-file")
    def vocabulary_typed(self, event: Input.Changed) -> None:
        draft = self.draft
        text = event.value.strip()
        if event.input.id == "vocab-pad":
            # like the seed: a number once it is one, else the text, for the validator to name
            draft.pad_to_multiple_of = (
                None if not text else int(text) if text.lstrip("-").isdigit() else text
            )
        elif self.query_one("#vocab-template", Select).value == TEMPLATE_FILE:
            draft.chat_template = text
        self._validate()

    def _show_vocabulary_problems(self, found: list[str]) -> None:
        """The recipe validator's problems with the vocabulary keys, under their fields; the
        field each is about marked invalid."""
        mine = [(key, p) for p in found if (key := _vocabulary_key(p)) is not None]
        note = self.query_one("#vocab-note", Static)
        note.update(Text("\n").join(Text.assemble(("✗ ", "bold red"), p) for _, p in mine))
        note.display = bool(mine)
        keys = {key for key, _ in mine}
        file_chosen = self.query_one("#vocab-template", Select).value == TEMPLATE_FILE
        for key, selector in VOCABULARY_KEYS.items():
            if not selector:
                continue
            if key == "merge.chat_template" and file_chosen:
                selector = "#vocab-template-file"
            self.query_one(selector).set_class(key in keys, "-invalid")
        if not file_chosen:
            self.query_one("#vocab-template-file").set_class(False, "-invalid")

    # -- parameters ----------------------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        spec = get_method(self.draft.method)
        assert spec is not None
        return spec

    def _editable(self) -> tuple[ParamSpec, ...]:
        """The parameters edited under [merge.parameters]: the method-wide ones, and for a recipe
        of slices the per-model ones too (there, every source's default)."""
        spec = self.spec
        return spec.global_params + (spec.model_params if self.draft.slices else ())

    async def _build_fields(self) -> None:
        """The parameters' fields for the draft's method (the old ones removed first: fields of
        two methods may share ids)."""
        draft = self.draft
        spec = self.spec
        self.query_one("#method-help", Static).update(f"{spec.summary} When: {spec.when_to_use}")
        box = self.query_one("#params", Vertical)
        await box.remove_children()
        self._texts = {}
        self._problems = {}
        fields: list[Any] = []
        if any(p.kind in (int, float) for p in spec.params):
            fields.append(Static(VALUES_HELP, classes="param-help", id="values-help"))
        if draft.slices:
            fields.append(Label("[[slices]] (edit them in the recipe TOML)", classes="model-title"))
            fields.append(
                Static(Text("\n".join(draft.slice_lines())), id="slices-info", classes="param-help")
            )
            if draft.models:
                fields.append(
                    Static(
                        Text.assemble(
                            ("✗ ", "bold red"),
                            "this recipe has [[slices]]: the models chosen in step 1 cannot be "
                            "added to it; put them in the slices' sources in the TOML",
                        ),
                        classes="param-help",
                    )
                )
            fields.append(
                Label("[merge.parameters]: every slice's defaults", classes="model-title")
            )
        for param in self._editable():
            fields += self._field(param, f"g-{param.name}", draft.parameters.get(param.name))
        for index, entry in enumerate([] if draft.slices else draft.models):
            if spec.model_params:
                fields.append(
                    Label(f"models[{index}]: {entry.model}", id=f"m{index}", classes="model-title")
                )
            for param in spec.model_params:
                fields += self._field(
                    param, f"m{index}-{param.name}", entry.parameters.get(param.name)
                )
        await box.mount_all(fields)
        self._validate()

    def _field(self, param: ParamSpec, field_id: str, value: Any) -> list[Any]:
        limits = param.range_text()
        default = "required" if param.required else f"default {param.default}"
        hint = f"{param.name} ({param.kind.__name__}{' in ' + limits if limits else ''}; {default}): {param.help}"
        if param.kind is bool and not isinstance(value, dict):  # overrides of a switch: rare
            text = values.value_text(param, value)
            self._texts[field_id] = [text, ""]
            return [
                Label(hint, classes="param-help"),
                Input(text, id=field_id, placeholder=default),
            ]
        plain, overrides = values.split(value)
        texts = [values.value_text(param, plain), values.overrides_text(param, overrides)]
        self._texts[field_id] = texts
        note = Static("", id=f"{field_id}-note", classes="field-note")
        self._show_note(note, plain, overrides)
        row = Horizontal(
            Input(
                texts[0],
                id=field_id,
                placeholder=default,
                validators=[_Syntax(lambda t: values.parse_value(param, t)[1])],
            ),
            Input(
                texts[1],
                id=f"{field_id}-filters",
                placeholder="overrides: mlp=0.7, …",
                validators=[_Syntax(lambda t: values.parse_overrides(param, t)[1])],
            ),
            classes="row",
        )
        return [Label(hint, classes="param-help"), row, note]

    @staticmethod
    def _show_note(note: Static, plain: Any, overrides: dict[str, Any], problem: str = "") -> None:
        """Under a parameter's fields: what cannot be read in them, or else the curve of each
        gradient across the layers (the value's, then each override's)."""
        if problem:
            note.update(Text.assemble(("✗ ", "bold red"), problem))
            note.display = True
            return
        curves = [("layers", plain)] if values.curve(plain) else []
        curves += [(k, v) for k, v in overrides.items() if values.curve(v)]
        line = Text()
        for label, gradient in curves:
            low, high = min(gradient), max(gradient)
            line.append(f"{label} ")
            line.append(values.curve(gradient), "bold")
            line.append(f" {values.number_text(low)}…{values.number_text(high)}   ")
        note.update(line)
        note.display = bool(curves)

    @on(Select.Changed, "#method")
    async def method_changed(self, event: Select.Changed) -> None:
        draft = self.draft
        if event.value == draft.method:
            return
        draft.method = str(event.value)
        allowed = {p.name for p in self._editable()}
        draft.parameters = {k: v for k, v in draft.parameters.items() if k in allowed}
        model_allowed = {p.name for p in self.spec.model_params}
        weight = self.spec.param("weight")
        needs_weight = "weight" in model_allowed and weight is not None and weight.required
        for entry in draft.models:
            entry.parameters = {k: v for k, v in entry.parameters.items() if k in model_allowed}
            if needs_weight:
                entry.parameters.setdefault("weight", 1.0)
        await self._build_fields()

    @on(Select.Changed, "#out-dtype")
    def dtype_changed(self, event: Select.Changed) -> None:
        self.draft.dtype = None if event.value is Select.NULL else str(event.value)
        self._validate()

    @on(
        Input.Changed,
        "#out-path, #out-device, #out-seed, #out-max-memory, #out-lora-rank, #out-lora-path",
    )
    def output_changed(self, event: Input.Changed) -> None:
        draft = self.draft
        value = event.value.strip()
        if event.input.id == "out-path":
            save = self.query_one("#save-path", Input)
            if save.value == draft.default_save_path():  # not chosen by hand: keep it beside
                save.value = f"{value.rstrip('/') or 'merged'}.toml"
            draft.output = value
        elif event.input.id == "out-device":
            draft.device = value
        elif event.input.id == "out-max-memory":
            draft.max_memory = value
        elif event.input.id == "out-lora-rank":
            # like the seed: a number once it is one, else the text, for the validator to name
            draft.lora_rank = None if not value else int(value) if value.isdigit() else value
        elif event.input.id == "out-lora-path":
            draft.lora_path = value
        else:
            draft.seed = int(value) if value.lstrip("-").isdigit() else value
        self._validate()

    @on(Input.Changed, "#save-path")
    def save_path_changed(self, event: Input.Changed) -> None:
        self.query_one("#headless", Static).update(
            f"headless, once saved: mergetui run {event.value.strip() or '…'}"
        )

    def _unread(self) -> bool:
        """Whether a field holds text that cannot be read (said in a toast): the draft would not
        be what the form shows."""
        if not self._problems:
            return False
        key, problem = next(iter(self._problems.items()))
        self.app.notify(
            f"{self._where(key)}: {problem}", severity="error", title="fix it first", markup=False
        )
        return True

    def action_run(self) -> None:
        if not self._unread():
            self.merge_app.action_run()

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        if self._unread():
            return
        save_recipe(self)

    @on(Input.Changed)
    def field_changed(self, event: Input.Changed) -> None:
        """A parameter's field changed: its two fields read together into the draft. Text that
        cannot be read leaves the draft's value as it was and says why, under the field and
        among the problems (saving waits until it is fixed)."""
        field_id = event.input.id or ""
        if field_id.startswith(("out-", "save-", "vocab-")):
            return
        key = field_id.removesuffix("-filters")
        scope, _, name = key.partition("-")
        param = self.spec.param(name)
        texts = self._texts.get(key)
        if param is None or texts is None:
            return  # a field of the form before the method changed
        texts[1 if field_id.endswith("-filters") else 0] = event.value
        draft = self.draft
        if scope == "g":
            target = draft.parameters
        elif int(scope[1:]) < len(draft.models):
            target = draft.models[int(scope[1:])].parameters
        else:
            return
        value, problem = values.parse_value(param, texts[0])
        overrides, overrides_problem = values.parse_overrides(param, texts[1])
        problem = problem or overrides_problem
        if not problem:
            value, problem = values.combine(value, overrides)
        if problem:
            self._problems[key] = problem
        else:
            self._problems.pop(key, None)
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
        if self.query(f"#{key}-note"):
            plain = values.parse_value(param, texts[0])[0]
            note = self.query_one(f"#{key}-note", Static)
            self._show_note(note, plain, overrides, problem or "")
        self._validate()

    @staticmethod
    def _where(key: str) -> str:
        """The recipe key a field edits: ``g-t`` → ``merge.parameters.t``."""
        scope, _, name = key.partition("-")
        return f"merge.parameters.{name}" if scope == "g" else f"models[{scope[1:]}].{name}"

    def _validate(self) -> None:
        from mergetui.errors import RecipeError
        from mergetui.recipe.toml_io import data_to_toml

        draft = self.draft
        problems = self.query_one("#problems", Static)
        unread = [
            Text.assemble(("✗ ", "bold red"), f"{self._where(key)}: {problem}")
            for key, problem in self._problems.items()
        ]
        found: list[str] = []
        try:
            draft.to_recipe()
        except RecipeError as exc:
            found = exc.problems
        if found:
            listed = [Text.assemble(("✗ ", "bold red"), p) for p in found]
            problems.update(Text("\n").join(unread + listed))
        else:
            problems.update(
                Text("\n").join(unread) if unread else Text("✓ valid recipe", "bold green")
            )
        self._show_vocabulary_problems(found)
        for key in ("lora_rank", "lora_path"):  # their own problems mark their fields
            field = self.query_one(f"#out-{key.replace('_', '-')}", Input)
            field.set_class(any(p.startswith(f"output.{key}") for p in found), "-invalid")
        self.query_one("#preview", Static).update(data_to_toml(draft.to_data()))
