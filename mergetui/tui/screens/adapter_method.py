"""Step 3 of an adapter merge: PEFT's combination type and its options, each adapter's weight,
the output, beside a live preview of the ``[adapters]`` recipe.

Like the method form of a model merge, nothing here is written per combination type: the types
and their one-line help come from :data:`mergetui.recipe.adapters.COMBINATIONS`, and the fields a
type takes from :func:`mergetui.recipe.adapters.combination_options` (the table the recipe
validator reads too). Every change re-validates the whole draft with the recipe layer's
validator, so the reasons shown, each under the field it is about, are the ones ``mergetui run``
would give; what the adapters' files say (ranks, modules, base) is the check step's.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Footer, Header, Input, Label, Select, Static

from mergetui.recipe.adapters import (
    ADAPTER_OPTIONS,
    COMBINATIONS,
    SIGN_METHODS,
    AdapterOption,
    combination_options,
)
from mergetui.tui.screens.base import StepScreen
from mergetui.tui.widgets.recipe_side import recipe_side, save_recipe, save_row

#: an option's field id (``a-density``), and a source's weight field (``w0``)
OPTION_PREFIX = "a-"


def typed_value(kind: type, text: str) -> Any:
    """A field's text as recipe data: None when empty, a number of ``kind`` when it reads as one,
    else the text itself (the validator then says what is wrong with it, by key)."""
    text = text.strip()
    if not text:
        return None
    try:
        return int(text) if kind is int else float(text) if kind is float else text
    except ValueError:
        return text


def _field_of(problem: str) -> str | None:
    """The field a validator problem is about: ``adapters.density: …`` → ``#a-density``,
    ``adapters.sources[1].weight: …`` → ``#w1``, ``output.path: …`` → ``#out-path``."""
    where = problem.split(": ", 1)[0]
    if where.startswith("adapters.sources[") and where.endswith("].weight"):
        return f"#w{where[len('adapters.sources[') : -len('].weight')]}"
    if where.startswith("adapters."):
        return f"#{OPTION_PREFIX}{where.removeprefix('adapters.')}"
    if where == "output.path":
        return "#out-path"
    return None


class AdapterMethodScreen(StepScreen):
    """The combination type, its options and the adapters' weights, validated as typed."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+s", "save", "Save recipe", show=True),
        Binding("ctrl+r", "run", "Run merge", show=True),
        Binding("ctrl+n", "run", "Run", show=False),
    ]
    HELP = """\
## 3 · Combination (LoRA adapters)

The adapters of step 1 are combined into one adapter as PEFT's `add_weighted_adapter` does
(`mergetui lora merge`). Pick the **combination type**; the fields below are the options it takes:
**density** (the ties, dare and magnitude_prune types: the fraction of entries kept), **majority
sign** (the ties types), **rank** and **svd clamp** (the svd types: the output's rank, by
default the largest input rank) and **seed** (the dare types' random masks). Each adapter's
**weight** follows (negative subtracts it), then the device (`cpu`, `cuda`, `auto`) and the output
folder. Every change is validated at once with the rules `mergetui run` applies.

**Ctrl+S** saves the `[adapters]` recipe; **Ctrl+R** runs the merge.

""" + "\n".join(f"- **{name}**: {info.summary}" for name, info in COMBINATIONS.items())

    def compose(self) -> ComposeResult:
        draft = self.draft
        yield Header()
        with Horizontal(id="method-step"):
            with VerticalScroll(id="method-form"):
                yield Label("3 · Combination: how the adapters become one")
                yield Select(
                    [(f"{name} — {info.summary}", name) for name, info in COMBINATIONS.items()],
                    value=draft.combination if draft.combination in COMBINATIONS else Select.NULL,
                    allow_blank=draft.combination not in COMBINATIONS,
                    id="combination",
                )
                yield Static("", id="combination-help", classes="param-help")
                yield Vertical(id="adapter-options")
                yield Label("adapters and their weights", classes="model-title")
                for index, source in enumerate(draft.adapters):
                    yield Label(
                        f"adapters.sources[{index}]: {source.lora}",
                        classes="param-help",
                        markup=False,
                    )
                    yield Input(str(source.weight), id=f"w{index}", placeholder="1.0")
                yield Label("output", classes="model-title")
                yield Label(
                    "adapters.device: cpu (default), cuda, cuda:N or auto", classes="param-help"
                )
                yield Input(
                    str(draft.adapter_options.get("device", "")),
                    placeholder="cpu",
                    id=f"{OPTION_PREFIX}device",
                )
                yield Label(
                    "output.path: the folder the combined adapter is written to",
                    classes="param-help",
                )
                yield Input(draft.output, id="out-path")
                yield from save_row(draft.default_save_path())
            yield from recipe_side()
        yield Footer()

    async def on_mount(self) -> None:
        await self._build_options()

    # -- the combination and its options -------------------------------------------------------
    async def _build_options(self) -> None:
        """The fields of the options the draft's combination takes, from the recipe layer's
        table (the old ones removed first: two types share field ids)."""
        draft = self.draft
        info = COMBINATIONS.get(draft.combination)
        help_line = self.query_one("#combination-help", Static)
        if info is None:
            help_line.update(f"{draft.combination}: not a combination type; choose one above")
        else:
            notes = []
            if info.same_rank:
                notes.append("the adapters need one rank per module")
            if draft.combination == "cat":
                notes.append("the output's rank is the sum of the ranks")
            help_line.update(info.summary + "".join(f"; {note}" for note in notes))
        box = self.query_one("#adapter-options", Vertical)
        await box.remove_children()
        fields: list[Any] = []
        for option in combination_options(draft.combination):
            fields += self._option_field(option, draft.adapter_options.get(option.key))
        await box.mount_all(fields)
        self._validate()

    @staticmethod
    def _option_field(option: AdapterOption, value: Any) -> list[Any]:
        field_id = f"{OPTION_PREFIX}{option.key}"
        hint = Label(f"adapters.{option.key}: {option.help}", classes="param-help")
        if option.key == "majority_sign":  # a choice, not a typed value
            choices = [(name, name) for name in SIGN_METHODS]
            if value is not None and value not in SIGN_METHODS:
                choices.append((f"{value} (as given)", value))
            return [
                hint,
                Select(
                    choices,
                    value=Select.NULL if value is None else value,
                    prompt=f"{SIGN_METHODS[0]} (default)",
                    id=field_id,
                ),
            ]
        placeholder = "required" if option.flag == "density" else "default"
        text = "" if value is None else str(value)
        return [hint, Input(text, id=field_id, placeholder=placeholder)]

    @on(Select.Changed, "#combination")
    async def combination_changed(self, event: Select.Changed) -> None:
        draft = self.draft
        if event.value is Select.NULL or event.value == draft.combination:
            return
        draft.combination = str(event.value)
        taken = {option.key for option in combination_options(draft.combination)}
        for option in ADAPTER_OPTIONS:  # an option the new type does not take would be refused
            if option.key not in taken:
                draft.adapter_options.pop(option.key, None)
        await self._build_options()

    @on(Select.Changed, f"#{OPTION_PREFIX}majority_sign")
    def sign_chosen(self, event: Select.Changed) -> None:
        options = self.draft.adapter_options
        if event.value is Select.NULL:
            options.pop("majority_sign", None)
        else:
            options["majority_sign"] = str(event.value)
        self._validate()

    @on(Input.Changed)
    def field_changed(self, event: Input.Changed) -> None:
        """A field changed: its value into the draft (as typed when it is not a number yet)."""
        draft = self.draft
        field_id = event.input.id or ""
        if field_id.startswith(OPTION_PREFIX):
            key = field_id.removeprefix(OPTION_PREFIX)
            kinds = {option.key: option.kind for option in ADAPTER_OPTIONS}
            value = typed_value(kinds.get(key, str), event.value)
            if value is None:
                draft.adapter_options.pop(key, None)
            else:
                draft.adapter_options[key] = value
        elif field_id.startswith("w") and field_id[1:].isdigit():
            index = int(field_id[1:])
            if index < len(draft.adapters):
                weight = typed_value(float, event.value)
                draft.adapters[index].weight = 1.0 if weight is None else weight
        elif field_id == "out-path":
            save = self.query_one("#save-path", Input)
            if save.value == draft.default_save_path():  # not chosen by hand: keep it beside
                save.value = f"{event.value.strip().rstrip('/') or 'merged-adapter'}.toml"
            draft.output = event.value.strip()
        elif field_id == "save-path":
            self.query_one("#headless", Static).update(
                f"headless, once saved: mergetui run {event.value.strip() or '…'}"
            )
            return
        else:
            return
        self._validate()

    # -- validation, saving, running -----------------------------------------------------------
    def _validate(self) -> None:
        """The recipe validator's problems on the right (each field it names marked), and the
        recipe's TOML below them."""
        from mergetui.errors import RecipeError
        from mergetui.recipe.toml_io import data_to_toml

        draft = self.draft
        found: list[str] = []
        try:
            draft.to_recipe()
        except RecipeError as exc:
            found = exc.problems
        problems = self.query_one("#problems", Static)
        if found:
            problems.update(Text("\n").join(Text.assemble(("✗ ", "bold red"), p) for p in found))
        else:
            problems.update(Text("✓ valid recipe", "bold green"))
        marked = {selector for p in found if (selector := _field_of(p)) is not None}
        for widget in self.query("#method-form Input, #method-form Select"):
            if widget.id and widget.id not in ("combination", "save-path"):
                widget.set_class(f"#{widget.id}" in marked, "-invalid")
        self.query_one("#preview", Static).update(data_to_toml(draft.to_data()))

    def action_run(self) -> None:
        self.merge_app.action_run()

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        """Save the ``[adapters]`` recipe through the recipe layer's writer (it validates)."""
        save_recipe(self)
