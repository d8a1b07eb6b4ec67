"""What every pass shares: its name, config key, CLI options, ordering rules, calibration needs and self-description;
and, for the norm passes, the norms they target and the refusal to apply twice.

A pass never reads the source itself: it declares what it needs measured (`needs(plan)`, a surgeon.calibrate.Needs)
and `convert()` hands it the measurement (`apply(plan, calibration)`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from surgeon.calibrate import Calibration, Needs
from surgeon.errors import SurgeonError
from surgeon.plan import Plan

RESIDUAL_READERS = "residual"  # shorthand role: every norm that reads the residual stream


@dataclass(frozen=True)
class Option:
    """One `surgeon convert` option of a pass: argparse's flags and keywords, and the pass's parameter it sets
    (None: read by the pass's own `from_args`). Passes that share an option list the same Option object."""

    flags: tuple[str, ...]
    param: str | None = None
    kwargs: dict = field(default_factory=dict, hash=False)

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


# the calibration text, shared by the passes that measure the source on text (listed in absorb-sinks' group)
CALIBRATION_TEXT = Option(("--data",), "data", dict(
    default=None, help="text to scan when there is no --scan (absorb-sinks) and to calibrate smooth: .txt, .jsonl, "
                       "a folder of them, or `default`"))


class Pass:
    """The interface `convert()` and the CLI see. A subclass sets `name` (its CLI name) and `key` (its block in
    config["surgeon"]), and overrides what it uses."""

    name = ""
    key = ""
    module_pass = False  # inserts (or works through) the paper's norm modules: `pipeline --control` leaves it out
    preserves_function = True  # --verify fails unless the logits match
    changes_linear_inputs = False  # the linear layers read other values than the source's (smooth, hadamard)
    after = MappingProxyType({})  # {pass that must come earlier in one convert: why}
    options: tuple[Option, ...] = ()  # its `surgeon convert` options
    cli_group = True  # its options under a heading of its name (False: among the command's own)

    @classmethod
    def from_args(cls, args) -> Pass:
        """The pass as the parsed `surgeon convert` options describe it."""
        return cls(**{o.param: getattr(args, o.dest) for o in cls.options if o.param})

    def needs(self, plan: Plan) -> Needs:
        """What the caller must measure or read on the source before `apply` (nothing, by default)."""
        return Needs()

    def check(self, plan: Plan) -> None:
        """Cheap refusals, run before anything is measured (and again by `apply`)."""

    def apply(self, plan: Plan, calibration: Calibration | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        """One clause on what the pass did, from its config block (`text`: what its calibration text was)."""
        return ""

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        """Why the converted model keeps the function, in the report's prose (`surgeon`: the whole config block)."""
        return ""

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        """The model card's row for the pass: (label, value), from its config block."""
        raise NotImplementedError

    def mark_applied(self, plan: Plan) -> None:
        plan.surgeon.setdefault("transforms", []).append(self.name)
        plan.applied.append(self.name)


TARGETS = Option(("--targets",), None, dict(
    default=RESIDUAL_READERS, help="comma-separated norm roles: residual (pre-attention, pre-MLP and final; the "
                                   "default), or pre_attention, pre_mlp, final, q_norm, k_norm"))
QK_NORM = Option(("--qk-norm",), None, dict(action="store_true",
                                             help="also target the per-head q_norm and k_norm (qwen3, qwen3_moe)"))


@dataclass
class NormTransform(Pass):
    """A transform that edits norms, chosen by role (`pre_attention`, `pre_mlp`, `final`, `q_norm`, ...);
    the role `residual` stands for the architecture's residual readers."""

    roles: tuple[str, ...] = (RESIDUAL_READERS,)
    options = (TARGETS, QK_NORM)
    cli_group = False

    @classmethod
    def from_args(cls, args) -> NormTransform:
        roles = tuple(r.strip() for r in args.targets.split(",") if r.strip())
        if args.qk_norm:
            roles += ("q_norm", "k_norm")
        return cls(roles=roles, **{o.param: getattr(args, o.dest) for o in cls.options if o.param})

    def target_patterns(self, plan: Plan) -> list[str]:
        roles: list[str] = []
        for role in self.roles:
            roles.extend(plan.arch.residual_readers if role == RESIDUAL_READERS else [role])
        return [plan.arch.norm_pattern(role) for role in dict.fromkeys(roles)]

    def target_norms(self, plan: Plan) -> list[str]:
        return [name for pattern in self.target_patterns(plan) for name in plan.expand(pattern)]

    def refuse_if_applied(self, plan: Plan) -> None:
        if self.key in plan.surgeon:
            done = plan.surgeon[self.key]
            raise SurgeonError(
                f"the model already has {self.name} (on {', '.join(done.get('targets', []))}); converting again "
                "would double it: convert the original checkpoint instead"
            )

    def check(self, plan: Plan) -> None:
        self.refuse_if_applied(plan)

    def apply(self, plan: Plan, calibration: Calibration | None = None) -> None:
        self.refuse_if_applied(plan)
        patterns = self.target_patterns(plan)
        for norm in self.target_norms(plan):
            self.rewrite_norm(plan, norm)
        plan.surgeon[self.key] = {**self.record(), "targets": patterns}
        self.mark_applied(plan)

    def rewrite_norm(self, plan: Plan, norm: str) -> None:
        raise NotImplementedError

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        extra = f", rank {block['rank']}" if "rank" in block else ""
        return f"{cls.key} targets", ", ".join(f"`{t}`" for t in block["targets"]) + extra

    def record(self) -> dict:
        """The transform's parameters as written into config["surgeon"][key]."""
        return {}
