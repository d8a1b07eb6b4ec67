"""What every transform shares: its name, the norms it targets, and the refusal to apply twice."""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.errors import SurgeonError
from surgeon.plan import Plan

RESIDUAL_READERS = "residual"  # shorthand role: every norm that reads the residual stream


@dataclass
class NormTransform:
    """A transform that edits norms, chosen by role (`pre_attention`, `pre_mlp`, `final`, `q_norm`, ...);
    the role `residual` stands for the architecture's residual readers."""

    roles: tuple[str, ...] = (RESIDUAL_READERS,)
    name = ""  # CLI name, e.g. "gated-norm"
    key = ""  # key of its block in config["surgeon"], e.g. "gated_norm"

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

    def apply(self, plan: Plan) -> None:
        self.refuse_if_applied(plan)
        patterns = self.target_patterns(plan)
        for norm in self.target_norms(plan):
            self.rewrite_norm(plan, norm)
        plan.surgeon[self.key] = {**self.record(), "targets": patterns}
        plan.surgeon.setdefault("transforms", []).append(self.name)
        plan.applied.append(self.name)

    def rewrite_norm(self, plan: Plan, norm: str) -> None:
        raise NotImplementedError

    def record(self) -> dict:
        """The transform's parameters as written into config["surgeon"][key]."""
        return {}
