"""Step 3: the method and its parameters, as a form generated from the method registry.

Nothing here is written per method: the fields come from each ``ParamSpec`` (global ones once,
per-model ones once per model), and every change re-validates the whole draft with the same
validator recipes go through, so the reasons shown are the ones ``mergetui run`` would give.

A numeric parameter takes a number or a gradient across the layers (a list, drawn as a curve
beside it), and per-tensor overrides in a second field (see :mod:`mergetui.tui.values`). A recipe
made of ``[[slices]]`` shows its slices read-only (they are edited in the TOML) and its
method-wide parameters, which are every slice source's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec, get_method
from mergetui.tui import values
from mergetui.tui.screens.base import StepScreen

#: the line above the parameters that says how to type gradients and overrides
VALUES_HELP = (
    "numbers: a value, or a gradient across the layers (0, 0.5, 1); overrides: filter=value "
    "(mlp=0.7, self_attn=[0, 1]), the first filter found in a tensor's name winning"
)


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

Then the output folder, the dtype (default: the base's), the device (`auto` takes a GPU when there
is one) and the seed (for DARE). **Ctrl+S** saves the recipe (and shows the headless command);
**Ctrl+R** runs the merge.

""" + "\n".join(f"- **{m.name}**: {m.summary} {m.when_to_use}" for m in METHODS.values())

    def __init__(self) -> None:
        super().__init__()
        #: field key (``g-t``, ``m0-weight``) → [value text, overrides text], as typed
        self._texts: dict[str, list[str]] = {}
        #: field key → why its text cannot be read (the draft keeps its last readable value)
        self._problems: dict[str, str] = {}

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
                yield Label("save the recipe as", classes="model-title")
                with Horizontal(classes="row"):
                    yield Input(draft.default_save_path(), id="save-path")
                    yield Button("Save (ctrl+s)", id="save", variant="success")
                yield Static(
                    f"headless, once saved: mergetui run {draft.default_save_path()}",
                    id="headless",
                    classes="param-help",
                )
            with Vertical(id="method-side"):
                yield Static("", id="problems")
                yield Static("", id="preview", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        await self._build_fields()

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

    @on(Input.Changed, "#out-path, #out-device, #out-seed")
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
        from mergetui.errors import MergeTuiError

        draft = self.draft
        if self._unread():
            return
        path = Path(
            self.query_one("#save-path", Input).value.strip() or draft.default_save_path()
        ).expanduser()
        try:
            saved = draft.save(path)
        except MergeTuiError as exc:
            self.app.notify(str(exc).splitlines()[0], severity="error", title="not saved")
            return
        self.merge_app.mark_saved()
        self.query_one("#headless", Static).update(f"headless: mergetui run {saved}")
        self.app.notify(f"replay headless with: mergetui run {saved}", title=f"saved {saved}")

    @on(Input.Changed)
    def field_changed(self, event: Input.Changed) -> None:
        """A parameter's field changed: its two fields read together into the draft. Text that
        cannot be read leaves the draft's value as it was and says why, under the field and
        among the problems (saving waits until it is fixed)."""
        field_id = event.input.id or ""
        if field_id.startswith(("out-", "save-")):
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
        try:
            draft.to_recipe()
        except RecipeError as exc:
            found = [Text.assemble(("✗ ", "bold red"), p) for p in exc.problems]
            problems.update(Text("\n").join(unread + found))
        else:
            problems.update(
                Text("\n").join(unread) if unread else Text("✓ valid recipe", "bold green")
            )
        self.query_one("#preview", Static).update(data_to_toml(draft.to_data()))
