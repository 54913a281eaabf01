"""A realistic, reproducible stream of network events: members join, municipalities register and
adopt each other's projects, funders open calls (every other one in two stages), receive
applications, invite some to a second stage and take their full proposals, award or decline them
(and applicants withdraw some), competence centres run validations and innovation days with
registrations, waitlists and cancellations.

Used by the crash-recovery and rebuild tests and by the benchmark; every event passes the gate and
most of them make the workflows decide something.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

CRITERIA = ("novelty", "effectiveness", "user_involvement", "transferability", "sustainability", "equity")
THEMES = (
    "migration_population.cohesion",
    "environment_urbanisation.climate",
    "economy.disadvantaged_groups",
    "education.lifelong_learning",
    "health_care.elderly_care",
)
LEVELS = ("metropolitan", "provincial", "district")


def envelope(event_type: str, source: str, subject: str, data: dict[str, Any], event_id: str) -> dict[str, Any]:
    """A structured CloudEvent as a partner offers it."""
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": f"/institutions/{source}",
        "type": event_type,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }


class Workload:
    """Generates ``(institution, event)`` pairs; ``run`` keeps ids unique across runs in one log."""

    def __init__(self, run: str, *, seed: int = 7, operator: str = "operator", members: int = 40) -> None:
        self.run = run
        self.random = random.Random(seed)
        self.operator = operator
        self.count = 0
        self.now = datetime.now(timezone.utc)
        kinds = ["municipality"] * 18 + ["funder"] * 4 + ["competence_centre"] * 3 + ["university"] * 6 + ["ngo"] * 9
        self.members = [(f"{run}-m{i:03d}", kinds[i % len(kinds)]) for i in range(members)]
        self.by_kind: dict[str, list[str]] = {}
        for member, kind in self.members:
            self.by_kind.setdefault(kind, []).append(member)
        self.projects: list[tuple[str, str]] = []  # (project_id, owner)
        self.days: list[tuple[str, str, list[tuple[str, str]]]] = []  # (day_id, organiser, registrations)
        self.calls: list[tuple[str, str]] = []  # (call_id, funder)
        self.applications: list[tuple[str, str, str]] = []  # (call_id, application_id, applicant), not yet answered
        self.two_stage: set[str] = set()  # the calls in two stages
        self.stage: dict[str, str] = {}  # application_id -> "invited" / "proposed", in a two-stage call

    def _id(self) -> str:
        self.count += 1
        return f"{self.run}-e{self.count}"

    def _event(self, event_type: str, source: str, subject: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return source, envelope(event_type, source, subject, data, self._id())

    def events(self, n: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Exactly ``n`` events: the members first, then a mix of the four workflows."""
        produced = 0
        for source, event in self._stream():
            if produced >= n:
                return
            produced += 1
            yield source, event

    def _stream(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for index, (member, kind) in enumerate(self.members):
            data: dict[str, Any] = {"id": member, "name": {"en": f"Member {member}"}, "kind": kind,
                                    "country": "TR" if kind == "municipality" else "FI"}
            if kind == "municipality":
                data["municipality_level"] = LEVELS[index % 3]
            yield self._event("institution.joined", self.operator, member, data)
        steps = (self._project, self._adoption, self._day, self._registration, self._registration,
                 self._cancellation, self._call, self._application, self._application, self._answer,
                 self._validation)
        while True:
            yield from self.random.choice(steps)()

    def _project(self) -> Iterator[tuple[str, dict[str, Any]]]:
        owner = self.random.choice(self.by_kind["municipality"])
        project_id = f"{self.run}-p{len(self.projects)}"
        self.projects.append((project_id, owner))
        yield self._event("project.registered", owner, project_id, {
            "project_id": project_id, "title": {"tr": f"Proje {len(self.projects)} ığüşöç"}, "owner": owner,
            "status": "active", "themes": self.random.sample(THEMES, 2), "service_model": "neighbourhood_based",
        })

    def _adoption(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.projects:
            return
        project_id, owner = self.random.choice(self.projects)
        adopter = self.random.choice([m for m in self.by_kind["municipality"] if m != owner])
        yield self._event("project.adopted", adopter, project_id, {
            "adoption_id": f"{self.run}-a{self.count}", "project_id": project_id, "adopter": adopter,
            "support": self.random.sample(["presentation", "technical_support", "study_visit", "training"], 2),
        })

    def _day(self) -> Iterator[tuple[str, dict[str, Any]]]:
        organiser = self.random.choice(self.by_kind["competence_centre"])
        day_id = f"{self.run}-d{len(self.days)}"
        self.days.append((day_id, organiser, []))
        starts = self.now + timedelta(days=60)
        yield self._event("innovation_day.scheduled", organiser, day_id, {
            "day_id": day_id, "title": {"fi": "Sosiaalisten innovaatioiden päivä"}, "format": "innovation_day",
            "starts_at": starts.isoformat(), "ends_at": (starts + timedelta(hours=7)).isoformat(),
            "attendance_mode": "online", "online_url": "https://example.org/day", "capacity": self.random.randint(4, 12),
            "registration_deadline": (starts - timedelta(days=7)).isoformat(), "themes": list(THEMES[:3]),
        })

    def _registration(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.days:
            return
        day_id, _, registrations = self.random.choice(self.days)
        registered = {participant for _, participant in registrations}  # (a member registers once a day)
        free = [(member, kind) for member, kind in self.members if member not in registered]
        if not free:
            return
        participant, kind = self.random.choice(free)
        registration_id = f"{self.run}-r{self.count}"
        registrations.append((registration_id, participant))
        yield self._event("innovation_day.registration_requested", participant, day_id, {
            "day_id": day_id, "registration_id": registration_id, "participant": participant,
            "role": "funder" if kind == "funder" else "innovator", "attendees": self.random.randint(1, 3),
            "interests": self.random.sample(THEMES, 2),
        })

    def _cancellation(self) -> Iterator[tuple[str, dict[str, Any]]]:
        candidates = [(day, reg) for day, _, regs in self.days for reg in regs]
        if not candidates:
            return
        day_id, (registration_id, participant) = self.random.choice(candidates)
        for day, _, regs in self.days:
            if day == day_id:
                regs.remove((registration_id, participant))
        yield self._event("innovation_day.registration_cancelled", participant, day_id,
                          {"day_id": day_id, "registration_id": registration_id})

    def _call(self) -> Iterator[tuple[str, dict[str, Any]]]:
        funder = self.random.choice(self.by_kind["funder"])
        call_id = f"{self.run}-c{len(self.calls)}"
        stages: dict[str, Any] = {"deadline_model": "single_stage"}
        if len(self.calls) % 2:
            self.two_stage.add(call_id)
            stages = {"deadline_model": "two_stage", "full_proposal_deadline": (self.now + timedelta(days=60)).isoformat()}
        self.calls.append((call_id, funder))
        yield self._event("call.published", funder, call_id, {
            "call_id": call_id, "title": {"en": f"Call {len(self.calls)}"}, "kind": "funding",
            "eligible_kinds": ["municipality", "ngo"], "eligible_countries": ["TR", "FI"],
            "budget": {"amount": "100000000.00", "currency": "EUR"},
            "opens_at": (self.now - timedelta(days=1)).isoformat(), "deadline": (self.now + timedelta(days=30)).isoformat(),
            **stages,
        })

    def _application(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.calls:
            return
        call_id, _ = self.random.choice(self.calls)
        applicant, _ = self.random.choice(self.members)
        application_id = f"{self.run}-ap{self.count}"
        self.applications.append((call_id, application_id, applicant))
        yield self._event("call.application_submitted", applicant, call_id, {
            "call_id": call_id, "application_id": application_id,
            "requested_amount": {"amount": "50000.00", "currency": "EUR"},
        })

    def _answer(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The call's funder awards or declines an application, or its applicant takes it back
        (some were rejected on arrival, ineligible: the workflow refuses to decide on those). In a
        two-stage call the funder first invites most to the second stage, and the applicant sends
        its full proposal, before the award."""
        if not self.applications:
            return
        picked = self.applications.pop(self.random.randrange(len(self.applications)))
        call_id, application_id, applicant = picked
        funder = dict(self.calls)[call_id]
        choice = self.random.random()
        stage = self.stage.get(application_id)
        if call_id in self.two_stage and choice >= 0.25 and stage != "proposed":
            if stage == "invited":
                self.stage[application_id] = "proposed"
                self.applications.append(picked)
                yield self._event("call.full_proposal_submitted", applicant, call_id, {
                    "call_id": call_id, "application_id": application_id, "summary": {"en": "The full proposal"},
                    "requested_amount": {"amount": "45000.00", "currency": "EUR"},
                })
                return
            if choice < 0.8:
                self.stage[application_id] = "invited"
                self.applications.append(picked)
                yield self._event("call.application_decided", funder, call_id, {
                    "call_id": call_id, "application_id": application_id, "decision": "invited",
                })
                return
        if choice < 0.25:
            yield self._event("call.application_withdrawn", applicant, call_id,
                              {"call_id": call_id, "application_id": application_id, "reason": {"en": "Plans changed"}})
        elif choice < 0.6:
            yield self._event("call.application_decided", funder, call_id, {
                "call_id": call_id, "application_id": application_id, "decision": "awarded",
                "awarded_amount": {"amount": "40000.00", "currency": "EUR"},
            })
        else:
            yield self._event("call.application_decided", funder, call_id, {
                "call_id": call_id, "application_id": application_id, "decision": "declined",
                "comment": {"en": "Not this round"},
            })

    def _validation(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.projects:
            return
        project_id, owner = self.random.choice(self.projects)
        coordinator = self.random.choice(self.by_kind["competence_centre"])
        validation_id = f"{self.run}-v{self.count}"
        yield self._event("validation.requested", owner, validation_id, {
            "validation_id": validation_id, "project_id": project_id, "coordinator": coordinator,
            "self_assessment": {"scores": {"novelty": 4}}, "quorum": 2,
        })
        reviewers = self.random.sample(self.by_kind["university"], 2)
        for reviewer in reviewers:
            yield self._event("validation.reviewer_assigned", coordinator, validation_id,
                              {"validation_id": validation_id, "reviewer": reviewer})
        for reviewer in reviewers:
            yield self._event("validation.review_submitted", reviewer, validation_id, {
                "validation_id": validation_id,
                "scores": {criterion: self.random.randint(1, 5) for criterion in CRITERIA},
                "evidence_level": self.random.randint(1, 5),
                "recommendation": self.random.choice(["validate", "revise", "reject"]),
            })
