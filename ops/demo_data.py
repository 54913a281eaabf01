"""The demo network as data: its members and the stories told in the seed documents.

- Mersin Metropolitan Municipality's Social Policy Office spreads its projects to 6 metropolitan,
  2 provincial and 9 district municipalities (more than 30 adoptions) through presentations,
  technical support and the study visits of the Social Policy Tour. The article names none of
  those municipalities: the ones below are real municipalities, chosen as an **illustration**.
- Genç İşi Kooperatif trains municipalities to work with social cooperatives (a `training`).
- An ESF+-style funding call receives applications; one arrives after the deadline; its funder
  awards one and declines another.
- Finland's social innovation competence centre (THL-led, with Diak, Kuntoutussäätiö, LUT,
  Silta-Valmennusyhdistys, Kuntaliitto and SOSTE) validates a practice and holds the Social
  Innovation Day in November, where developers meet funders.
- An Arabic-speaking social innovation centre supports innovators (funding, mentoring, networks).

Texts are the institutions' own languages (Turkish, Finnish, Swedish, English, Arabic); the
summaries are the demo's own short descriptions, not quotations. Business ids are given only
where they were checked (THL, LUT). Invented for the demo: the ESF+ fund and every call, the
women's cooperative in Mersin, the Amman centre, the Finnish practice and its validation, who
registers for which gathering, and the Social Innovation Day's venue and capacity.

Every event id is deterministic (``demo-…``), so offering the network again changes nothing.
Times the workflows act on (a call's deadline, a day's registration deadline) are relative to the
moment the timed part starts: the demo compresses weeks into seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Literal

from schemas import registry

# --- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """One event offered by ``institution``, over NATS ingress or ``POST /events``."""

    institution: str
    event: dict[str, Any]
    chapter: str
    via: Literal["nats", "http"] = "nats"


@dataclass(frozen=True)
class WaitUntil:
    """Let time pass until ``moment`` (a deadline the story needs behind it)."""

    moment: datetime
    chapter: str


@dataclass(frozen=True)
class WaitForMeetings:
    """Wait until the bus's timer has proposed the meetings of ``day_id``."""

    day_id: str
    chapter: str


Step = Offer | WaitUntil | WaitForMeetings


def event(event_type: str, source: str, data: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """A structured CloudEvent with a deterministic id; ``time`` is left to the gate."""
    subject = str(data[registry.spec_for(event_type).subject_field])
    return {
        "specversion": "1.0",
        "id": f"demo-{event_type}-{key or subject}",
        "source": f"/institutions/{source}",
        "type": event_type,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }


# --- members ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    id: str
    name: dict[str, str]
    kind: str
    country: str
    region: str | None = None
    level: str | None = None
    themes: tuple[str, ...] = ()
    identifiers: tuple[tuple[str, str], ...] = ()
    website: str | None = None
    illustrative: bool = False
    """Invented for the demo, or (municipalities) not named by the source article."""

    def joined(self, operator: str) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "name": self.name, "kind": self.kind, "country": self.country}
        optional = {"region": self.region, "municipality_level": self.level, "website": self.website}
        data.update({k: v for k, v in optional.items() if v is not None})
        if self.themes:
            data["themes"] = list(self.themes)
        if self.identifiers:
            data["identifiers"] = [{"scheme": s, "value": v} for s, v in self.identifiers]
        return event("institution.joined", operator, data)


MERSIN = "tr-mersin-bb"
SOCIAL_POLICY_OFFICE = "tr-mersin-spo"
SOSYOKENT = "tr-asbu-sosyokent"
GENC_ISI = "tr-genc-isi-koop"
WOMENS_COOP = "tr-akdeniz-kadin-koop"
THL = "fi-thl"
COMPETENCE_CENTRE = "fi-si-osaamiskeskus"
DIAK = "fi-diak"
KUNTOUTUSSAATIO = "fi-kuntoutussaatio"
LUT = "fi-lut"
SILTA = "fi-silta-valmennus"
KUNTALIITTO = "fi-kuntaliitto"
SOSTE = "fi-soste"
ECCSI = "eu-eccsi"
ESF_FUND = "eu-esf-fund"
STEA = "fi-stea"
AMMAN = "jo-amman-sic"

# The municipalities Mersin's projects spread to: (id, name, level, province). Real names; which
# of them adopted what is an illustration (the article gives only the counts 6/2/9).
ADOPTERS: tuple[tuple[str, str, str, str], ...] = (
    ("tr-adana-bb", "Adana Büyükşehir Belediyesi", "metropolitan", "Adana"),
    ("tr-antalya-bb", "Antalya Büyükşehir Belediyesi", "metropolitan", "Antalya"),
    ("tr-izmir-bb", "İzmir Büyükşehir Belediyesi", "metropolitan", "İzmir"),
    ("tr-eskisehir-bb", "Eskişehir Büyükşehir Belediyesi", "metropolitan", "Eskişehir"),
    ("tr-hatay-bb", "Hatay Büyükşehir Belediyesi", "metropolitan", "Hatay"),
    ("tr-gaziantep-bb", "Gaziantep Büyükşehir Belediyesi", "metropolitan", "Gaziantep"),
    ("tr-nigde-bld", "Niğde Belediyesi", "provincial", "Niğde"),
    ("tr-karaman-bld", "Karaman Belediyesi", "provincial", "Karaman"),
    ("tr-tarsus-bld", "Tarsus Belediyesi", "district", "Mersin"),
    ("tr-yenisehir-bld", "Yenişehir Belediyesi", "district", "Mersin"),
    ("tr-mezitli-bld", "Mezitli Belediyesi", "district", "Mersin"),
    ("tr-erdemli-bld", "Erdemli Belediyesi", "district", "Mersin"),
    ("tr-silifke-bld", "Silifke Belediyesi", "district", "Mersin"),
    ("tr-seyhan-bld", "Seyhan Belediyesi", "district", "Adana"),
    ("tr-cukurova-bld", "Çukurova Belediyesi", "district", "Adana"),
    ("tr-cankaya-bld", "Çankaya Belediyesi", "district", "Ankara"),
    ("tr-tepebasi-bld", "Tepebaşı Belediyesi", "district", "Eskişehir"),
)

MEMBERS: tuple[Member, ...] = (
    Member(MERSIN, {"tr": "Mersin Büyükşehir Belediyesi", "en": "Mersin Metropolitan Municipality"},
           "municipality", "TR", "Mersin", "metropolitan",
           ("health_care.elderly_care", "economy.disadvantaged_groups", "environment_urbanisation.climate",
            "migration_population.cohesion"), website="https://www.mersin.bel.tr"),
    Member(SOCIAL_POLICY_OFFICE, {"tr": "Mersin Büyükşehir Belediyesi Sosyal Politikalar Ofisi",
                                  "en": "Social Policy Office of Mersin Metropolitan Municipality"},
           "public_agency", "TR", "Mersin", themes=("health_care", "economy", "migration_population")),
    *(Member(id_, {"tr": name}, "municipality", "TR", province, level, illustrative=True)
      for id_, name, level, province in ADOPTERS),
    Member(SOSYOKENT, {"tr": "Ankara Sosyal Bilimler Üniversitesi Sosyal İnovasyon Merkezi (Sosyokent)",
                       "en": "Social Innovation Centre of Ankara Social Sciences University (Sosyokent)"},
           "university", "TR", "Ankara",
           themes=("migration_population", "environment_urbanisation", "economy", "education", "health_care")),
    Member(GENC_ISI, {"tr": "Genç İşi Kooperatif", "en": "Genç İşi Cooperative"}, "cooperative", "TR",
           themes=("economy.disadvantaged_groups", "education.lifelong_learning")),
    Member(WOMENS_COOP, {"tr": "Akdeniz Kadın Emeği Kooperatifi"}, "cooperative", "TR", "Mersin",
           themes=("economy.disadvantaged_groups",), illustrative=True),
    Member(THL, {"fi": "Terveyden ja hyvinvoinnin laitos", "sv": "Institutet för hälsa och välfärd",
                 "en": "Finnish Institute for Health and Welfare"}, "public_agency", "FI", "Uusimaa",
           identifiers=(("fi-business-id", "2229500-6"),), website="https://thl.fi"),
    Member(COMPETENCE_CENTRE, {"fi": "Sosiaalisten innovaatioiden osaamiskeskus",
                               "en": "Finnish Competence Centre for Social Innovation"},
           "competence_centre", "FI", "Uusimaa", themes=("health_care", "economy", "migration_population")),
    Member(DIAK, {"fi": "Diakonia-ammattikorkeakoulu", "en": "Diaconia University of Applied Sciences"},
           "university", "FI", "Uusimaa", website="https://www.diak.fi"),
    Member(KUNTOUTUSSAATIO, {"fi": "Kuntoutussäätiö", "en": "Rehabilitation Foundation"}, "ngo", "FI", "Uusimaa"),
    Member(LUT, {"fi": "LUT-yliopisto", "en": "LUT University"}, "university", "FI", "Etelä-Karjala",
           identifiers=(("fi-business-id", "0245904-2"),), website="https://www.lut.fi"),
    Member(SILTA, {"fi": "Silta-Valmennusyhdistys ry"}, "ngo", "FI"),
    Member(KUNTALIITTO, {"fi": "Suomen Kuntaliitto", "sv": "Finlands Kommunförbund",
                         "en": "Association of Finnish Municipalities"}, "ngo", "FI", "Uusimaa",
           website="https://www.kuntaliitto.fi"),
    Member(SOSTE, {"fi": "SOSTE Suomen sosiaali ja terveys ry",
                   "en": "SOSTE Finnish Federation for Social Affairs and Health"}, "ngo", "FI", "Uusimaa",
           website="https://www.soste.fi"),
    Member(ECCSI, {"en": "European Competence Centre for Social Innovation"}, "competence_centre", "BE"),
    Member(ESF_FUND, {"en": "ESF+ Social Inclusion Fund", "fi": "ESR+ osallisuusrahasto"}, "funder", "BE",
           illustrative=True),
    Member(STEA, {"fi": "Sosiaali- ja terveysjärjestöjen avustuskeskus STEA",
                  "en": "Funding Centre for Social Welfare and Health Organisations STEA"}, "funder", "FI", "Uusimaa"),
    Member(AMMAN, {"ar": "مركز عمّان للابتكار الاجتماعي", "en": "Amman Social Innovation Centre"}, "ngo", "JO",
           "عمّان", themes=("economy.disadvantaged_groups", "migration_population.cohesion"), illustrative=True),
)

# --- projects ---------------------------------------------------------------------------------

SPO_LEAD = {"institution": SOCIAL_POLICY_OFFICE, "role": "lead", "relation": "coordination"}


def _mersin_project(project_id: str, tr: str, en: str, summary_tr: str, summary_en: str,
                    themes: tuple[str, ...], service_model: str, started_on: str) -> dict[str, Any]:
    return {
        "project_id": project_id, "title": {"tr": tr, "en": en}, "summary": {"tr": summary_tr, "en": summary_en},
        "themes": list(themes), "owner": MERSIN, "partners": [SPO_LEAD], "status": "active",
        "started_on": started_on, "location": {"country": "TR", "region": "Mersin"}, "service_model": service_model,
    }


MERSIN_PROJECTS: tuple[dict[str, Any], ...] = (
    _mersin_project(
        "mersin-mahalle-mutfaklari", "Mahalle Mutfakları", "Neighbourhood Kitchens",
        "Mahallelerde kurulan mutfaklar aracılığıyla ihtiyaç sahibi hanelere sıcak yemek ulaştıran mahalle temelli hizmet.",
        "A neighbourhood-based service bringing hot meals to households in need through kitchens in the neighbourhoods.",
        ("health_care.basic_services", "economy.disadvantaged_groups", "migration_population.cohesion"),
        "neighbourhood_based", "2020-04-01"),
    _mersin_project(
        "mersin-hadi-gel-koyumuze", "Hadi Gel Köyümüze Destek Verelim", "Come and Support Our Village",
        "Kırsaldaki üreticileri ve köy yaşamını destekleyen, kentlileri köylerle buluşturan dayanışma projesi.",
        "A solidarity project supporting rural producers and village life, bringing city dwellers and villages together.",
        ("economy.income_inequality", "environment_urbanisation.urbanisation"), "other", "2021-05-01"),
    _mersin_project(
        "mersin-kadin-ustalar", "Mersinli Kadın Ustalar", "Women Craftworkers of Mersin",
        "Kadınların ustalık becerilerini geliştiren, emeklerini görünür kılan ve gelir elde etmelerini destekleyen proje.",
        "Develops women's craft skills, makes their work visible and helps them earn an income.",
        ("economy.disadvantaged_groups", "education.lifelong_learning"), "neighbourhood_based", "2021-03-08"),
    _mersin_project(
        "mersin-mercan-iklim-merkezi", "Mercan 100. Yıl İklim ve Çevre Bilim Merkezi",
        "Mercan Centenary Climate and Environmental Science Centre",
        "Çocuklara ve gençlere iklim değişikliğini ve çevre bilimini uygulamalı olarak anlatan bilim merkezi.",
        "A science centre teaching children and young people about climate change and environmental science, hands-on.",
        ("environment_urbanisation.climate", "education.lifelong_learning"), "other", "2023-10-29"),
    _mersin_project(
        "mersin-otizm-aile-danisma", "Otizm Aile Danışma Merkezi", "Autism Family Counselling Centre",
        "Otizmli çocukların ailelerine danışmanlık, rehberlik ve psikososyal destek sunan merkez.",
        "Counselling, guidance and psychosocial support for the families of autistic children.",
        ("health_care.basic_services", "economy.disability_participation"), "neighbourhood_based", "2022-04-02"),
    _mersin_project(
        "mersin-evde-yasli-destek", "Evde Yaşlı Destek Hizmetleri", "Home-based support for older people",
        "İleri yaştaki bireylere düzenli arama, temizlik, bakım ve sağlık hizmetlerinin evlerinde sunulduğu "
        "ev temelli hizmet.",
        "Regular calls, cleaning, care and health services for older people, in their own homes.",
        ("health_care.elderly_care", "migration_population.ageing"), "home_based", "2020-01-15"),
    _mersin_project(
        "mersin-sosyal-yasam-merkezleri", "Sosyal Yaşam Merkezleri", "Social Life Centres",
        "Vatandaşın ihtiyaç duyduğu hizmete kendi mahallesinde kolayca ulaşmasını sağlayan sosyal yaşam merkezleri.",
        "Social life centres through which residents reach the services they need in their own neighbourhood.",
        ("health_care.basic_services", "migration_population.cohesion"), "neighbourhood_based", "2020-09-01"),
)

SOSYOKENT_PARK: dict[str, Any] = {
    "project_id": "sosyokent-sosyal-inovasyon-parki",
    "title": {"tr": "Sosyokent: Sosyal İnovasyon Parkı", "en": "Sosyokent: a social innovation park"},
    "summary": {
        "tr": "Kamu kurumlarını, şirketleri, sivil toplum kuruluşlarını ve üniversiteleri tek çatı altında buluşturan "
              "sosyal inovasyon parkı: destek merkezleri, eğitim, teorik ve uygulamalı laboratuvarlar, kuluçka merkezi, "
              "uluslararası hub ve bilgi transfer ofisi.",
        "en": "A social innovation park bringing public bodies, companies, NGOs and universities under one roof: support "
              "centres, training, theoretical and applied labs, an incubator, an international hub and a knowledge "
              "transfer office.",
    },
    "themes": ["migration_population", "environment_urbanisation", "economy", "education", "health_care"],
    "owner": SOSYOKENT, "status": "planned", "location": {"country": "TR", "region": "Ankara"}, "service_model": "other",
}

AMMAN_PROGRAMME: dict[str, Any] = {
    "project_id": "amman-sic-innovators-support",
    "title": {"ar": "برنامج دعم المبتكرين الاجتماعيين", "en": "Support programme for social innovators"},
    "summary": {
        "ar": "يجمع المركز أصحاب المصلحة من الحكومة والأوساط الأكاديمية والقطاع غير الربحي والقطاع الخاص لتطوير "
              "حلول مستدامة للمشاكل الاجتماعية، ويقدّم للمبتكرين التمويل والإرشاد وفرص التواصل، ويقيس نجاحه بالأثر "
              "الفعلي في المجتمعات التي يخدمها، ويتبادل الممارسات مع شبكة مراكز الابتكار الاجتماعي حول العالم.",
        "en": "The centre brings government, academia, non-profits and companies together on lasting solutions to social "
              "problems, offers innovators funding, mentoring and networks, measures its success by its impact in the "
              "communities it serves, and shares practice with the global network of social innovation centres.",
    },
    "themes": ["economy.disadvantaged_groups", "migration_population.cohesion"],
    "owner": AMMAN, "status": "active", "location": {"country": "JO", "region": "عمّان"}, "service_model": "other",
}

SILTA_PRACTICE: dict[str, Any] = {
    "project_id": "silta-tyoelamaosallisuus",
    "title": {"fi": "Työelämäosallisuutta tukeva valmennusmalli", "en": "Coaching model for participation in working life"},
    "summary": {
        "fi": "Työelämän ulkopuolella olevat nuoret ja aikuiset etenevät yksilöllisen valmennuksen ja työkokeilujen kautta "
              "kohti työtä tai koulutusta.",
        "en": "Young people and adults outside working life move towards work or education through individual coaching "
              "and work trials.",
    },
    "themes": ["economy.disadvantaged_groups", "economy.disability_participation", "education.lifelong_learning"],
    "owner": SILTA, "partners": [{"institution": KUNTOUTUSSAATIO, "role": "partner", "relation": "partnership"}],
    "status": "active", "started_on": "2021-01-01", "location": {"country": "FI"}, "service_model": "other",
}

PROJECTS: tuple[dict[str, Any], ...] = (*MERSIN_PROJECTS, SOSYOKENT_PARK, AMMAN_PROGRAMME)

# Who took up which of Mersin's practices, with the support given: P presentation, T technical
# support, L planning support, V study visit (Social Policy Tour). 32 adoptions by 17 municipalities.
SUPPORT = {"P": "presentation", "T": "technical_support", "L": "planning_support", "V": "study_visit"}
ADOPTIONS: tuple[tuple[str, str, str], ...] = (
    ("tr-adana-bb", "mersin-mahalle-mutfaklari", "PTV"), ("tr-adana-bb", "mersin-kadin-ustalar", "PV"),
    ("tr-adana-bb", "mersin-otizm-aile-danisma", "TL"),
    ("tr-antalya-bb", "mersin-mahalle-mutfaklari", "PV"), ("tr-antalya-bb", "mersin-sosyal-yasam-merkezleri", "T"),
    ("tr-izmir-bb", "mersin-mercan-iklim-merkezi", "PTV"), ("tr-izmir-bb", "mersin-evde-yasli-destek", "P"),
    ("tr-eskisehir-bb", "mersin-otizm-aile-danisma", "PT"), ("tr-eskisehir-bb", "mersin-kadin-ustalar", "V"),
    ("tr-hatay-bb", "mersin-mahalle-mutfaklari", "TLV"), ("tr-hatay-bb", "mersin-hadi-gel-koyumuze", "PV"),
    ("tr-hatay-bb", "mersin-evde-yasli-destek", "T"),
    ("tr-gaziantep-bb", "mersin-sosyal-yasam-merkezleri", "PV"), ("tr-gaziantep-bb", "mersin-mahalle-mutfaklari", "P"),
    ("tr-nigde-bld", "mersin-hadi-gel-koyumuze", "PT"), ("tr-nigde-bld", "mersin-mahalle-mutfaklari", "V"),
    ("tr-karaman-bld", "mersin-kadin-ustalar", "PT"), ("tr-karaman-bld", "mersin-evde-yasli-destek", "V"),
    ("tr-tarsus-bld", "mersin-mahalle-mutfaklari", "PTV"), ("tr-tarsus-bld", "mersin-evde-yasli-destek", "T"),
    ("tr-yenisehir-bld", "mersin-sosyal-yasam-merkezleri", "V"), ("tr-yenisehir-bld", "mersin-kadin-ustalar", "P"),
    ("tr-mezitli-bld", "mersin-otizm-aile-danisma", "V"), ("tr-mezitli-bld", "mersin-mercan-iklim-merkezi", "P"),
    ("tr-erdemli-bld", "mersin-hadi-gel-koyumuze", "TV"),
    ("tr-silifke-bld", "mersin-hadi-gel-koyumuze", "PV"), ("tr-silifke-bld", "mersin-mahalle-mutfaklari", "T"),
    ("tr-seyhan-bld", "mersin-mahalle-mutfaklari", "PV"),
    ("tr-cukurova-bld", "mersin-kadin-ustalar", "PT"),
    ("tr-cankaya-bld", "mersin-otizm-aile-danisma", "P"), ("tr-cankaya-bld", "mersin-sosyal-yasam-merkezleri", "PV"),
    ("tr-tepebasi-bld", "mersin-mercan-iklim-merkezi", "PV"),
)


def adoption(adopter: str, project_id: str, support: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "adoption_id": f"adopt-{project_id.removeprefix('mersin-')}-{adopter}",
        "project_id": project_id, "adopter": adopter, "support": [SUPPORT[s] for s in support],
    }
    return event("project.adopted", MERSIN, data, key=data["adoption_id"])


# --- the timed part: calls, validation, gatherings ----------------------------------------------

ESF_CALL = "esf-plus-social-inclusion-pilots"
VALIDATION = "val-silta-tyoelamaosallisuus"
SI_DAY = "fi-sosiaalisten-innovaatioiden-paiva"
TRAINING = "genc-isi-belediye-egitimi"
STUDY_VISIT = "mersin-sosyal-politikalar-turu"
LATE_APPLICATION = "app-esf-silta-valmennus"

CALL_SECONDS = 2.5
"""The ESF+ call closes this long after it is published."""
DAY_SECONDS = 3.5
"""The Social Innovation Day's registration closes this long after it is scheduled."""


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _tz(hours: int) -> timezone:
    return timezone(timedelta(hours=hours))


def innovation_day_date(now: datetime) -> date:
    """The next Social Innovation Day: 12 November, this year or — when that is too close — the next."""
    day = date(now.year, 11, 12)
    return day if day - now.date() > timedelta(days=1) else date(now.year + 1, 11, 12)


def _registration(day_id: str, participant: str, role: str, attendees: int, **extra: Any) -> Offer:
    data: dict[str, Any] = {"day_id": day_id, "registration_id": f"reg-{day_id}-{participant}", "participant": participant,
            "role": role, "attendees": attendees, **extra}
    return Offer(participant, event("innovation_day.registration_requested", participant, data,
                                    key=data["registration_id"]), "Registrations")


def _call(owner: str, call_id: str, title: dict[str, str], summary: dict[str, str], kind: str, themes: list[str],
          opens_at: datetime, deadline: datetime, **extra: Any) -> Offer:
    data = {"call_id": call_id, "title": title, "summary": summary, "kind": kind, "themes": themes,
            "opens_at": _iso(opens_at), "deadline": _iso(deadline), "deadline_model": "single_stage", **extra}
    return Offer(owner, event("call.published", owner, data), "Calls")


def _application(applicant: str, application_id: str, amount: str, chapter: str, **extra: Any) -> Offer:
    data = {"call_id": ESF_CALL, "application_id": application_id,
            "requested_amount": {"amount": amount, "currency": "EUR"}, **extra}
    return Offer(applicant, event("call.application_submitted", applicant, data, key=application_id), chapter)


def funding_decisions() -> list[Offer]:
    """After the ESF+ call's first stage its funder decides: it invites Genç İşi to the second
    stage, which sends its full proposal and is funded, with less than it asked for; Diak's
    application is declined."""
    chapter = "Funding decisions"
    invited: dict[str, Any] = {"call_id": ESF_CALL, "application_id": "app-esf-genc-isi", "decision": "invited",
               "comment": {"en": "Please detail the municipalities' co-funding in the full proposal.",
                           "tr": "Lütfen tam teklifte belediyelerin eş finansmanını ayrıntılandırın."}}
    proposal: dict[str, Any] = {"call_id": ESF_CALL, "application_id": "app-esf-genc-isi",
                "summary": {"tr": "Mersin ve Tarsus belediyeleri kadın kooperatiflerinden hizmet alımı yapar; "
                                  "çalışma ziyaretleri ortakların kendi payından karşılanır.",
                            "en": "Mersin and Tarsus buy services from women's cooperatives; the study visits are "
                                  "the partners' own share."},
                "requested_amount": {"amount": "220000.00", "currency": "EUR"}}
    awarded: dict[str, Any] = {"call_id": ESF_CALL, "application_id": "app-esf-genc-isi", "decision": "awarded",
               "awarded_amount": {"amount": "200000.00", "currency": "EUR"},
               "comment": {"en": "Funded for 24 months; the study visits are the partners' own share.",
                           "tr": "24 ay için desteklendi; çalışma ziyaretleri ortakların kendi payıdır."}}
    declined: dict[str, Any] = {"call_id": ESF_CALL, "application_id": "app-esf-diak", "decision": "declined",
                "comment": {"en": "Strong, but outside this round's priority on neighbourhood services.",
                            "fi": "Vahva hakemus, mutta tämän kierroksen painopiste on lähipalveluissa."}}
    return [
        Offer(ESF_FUND, event("call.application_decided", ESF_FUND, invited, key="invite-app-esf-genc-isi"), chapter),
        Offer(GENC_ISI, event("call.full_proposal_submitted", GENC_ISI, proposal, key="proposal-app-esf-genc-isi"), chapter),
        *(Offer(ESF_FUND, event("call.application_decided", ESF_FUND, data, key=data["application_id"]), chapter)
          for data in (awarded, declined)),
    ]


def _validation(source: str, event_type: str, data: dict[str, Any], key: str) -> Offer:
    data = {"validation_id": VALIDATION, **data}
    return Offer(source, event(event_type, source, data, key=key), "Validation (over HTTP)", via="http")


def calls(now: datetime) -> list[Offer]:
    """The ESF+-style call (closing seconds from now) with applications in time, and two open calls."""
    esf_deadline = now + timedelta(seconds=CALL_SECONDS)
    return [
        _call(ESF_FUND, ESF_CALL,
              {"en": "ESF+ Social Inclusion Pilots", "fi": "ESR+ sosiaalisen osallisuuden kokeilut",
               "tr": "ESF+ Sosyal İçerme Pilotları"},
              {"en": "Funding for municipalities, cooperatives, NGOs and universities piloting services with "
                     "disadvantaged groups.",
               "fi": "Rahoitusta kunnille, osuuskunnille, järjestöille ja korkeakouluille, jotka kokeilevat palveluja "
                     "heikommassa asemassa olevien kanssa."},
              "funding", ["economy.disadvantaged_groups", "health_care.basic_services", "education.lifelong_learning"],
              now - timedelta(days=30), esf_deadline,
              eligible_kinds=["municipality", "cooperative", "ngo", "university"], eligible_countries=["TR", "FI"],
              budget={"amount": "1500000.00", "currency": "EUR"},
              deadline_model="two_stage", full_proposal_deadline=_iso(esf_deadline + timedelta(days=45))),
        _application(GENC_ISI, "app-esf-genc-isi", "240000.00", "Calls", partners=[MERSIN, "tr-tarsus-bld"]),
        _application(MERSIN, "app-esf-mersin-bb", "300000.00", "Calls", project_id="mersin-mahalle-mutfaklari"),
        _application(DIAK, "app-esf-diak", "180000.00", "Calls", partners=[SOSTE, KUNTALIITTO]),
        _call(SOSYOKENT, "sosyokent-lab-partnership",
              {"tr": "Sosyokent Uygulamalı Laboratuvarlar Ortaklık Çağrısı",
               "en": "Sosyokent applied labs: call for partners"},
              {"tr": "Göç ve nüfus ile çevre ve kentleşme alanlarındaki uygulamalı laboratuvarlar için kamu kurumları, "
                     "şirketler, STK'lar ve üniversitelerden ortak aranıyor."},
              "partnership", ["migration_population", "environment_urbanisation"],
              now - timedelta(days=7), now + timedelta(days=60)),
        _call(COMPETENCE_CENTRE, "fi-si-validation-pilot",
              {"fi": "Sosiaalisten innovaatioiden validointipilotti", "en": "Validation pilot for social innovations"},
              {"fi": "Haemme toimintamalleja pilotoimaan validointiprosessia: kehittäjän itsearviointi ja "
                     "arvioijien osuus."},
              "challenge", ["health_care", "economy"], now - timedelta(days=3), now + timedelta(days=45),
              eligible_countries=["FI"]),
    ]


def validation(now: datetime) -> list[Offer]:
    """A Finnish practice validated: self-assessment, two reviewers, a question, the rule decides."""
    return [
        Offer(SILTA, event("project.registered", SILTA, SILTA_PRACTICE), "Validation (over HTTP)", via="http"),
        _validation(SILTA, "validation.requested", {
            "project_id": SILTA_PRACTICE["project_id"], "coordinator": COMPETENCE_CENTRE, "quorum": 2,
            "due_by": _iso(now + timedelta(days=60)),
            "self_assessment": {
                "scores": {"novelty": 4, "effectiveness": 3, "user_involvement": 5, "transferability": 4},
                "evidence_level": 2,
                "statement": {
                    "fi": "Mallia on käytetty kolmessa kunnassa vuodesta 2021. Osallistujien kokemuksia kerätään "
                          "säännöllisesti, mutta vertailuryhmää ei vielä ole.",
                    "en": "The model has been used in three municipalities since 2021. Participants' experiences are "
                          "collected regularly, but there is no comparison group yet.",
                },
            },
        }, "requested"),
        *(_validation(COMPETENCE_CENTRE, "validation.reviewer_assigned",
                      {"reviewer": reviewer, "due_by": _iso(now + timedelta(days=30))}, f"assigned-{reviewer}")
          for reviewer in (LUT, DIAK)),
        _validation(LUT, "validation.info_requested", {"questions": [
            {"question_id": "q1", "text": {"fi": "Miten osallistujat ovat olleet mukana mallin kehittämisessä?",
                                           "en": "How have participants been involved in developing the model?"}},
            {"question_id": "q2", "text": {"fi": "Mitä mallin käyttöönotto maksaa kunnalle ensimmäisenä vuonna?"}},
        ]}, "questions-lut"),
        _validation(SILTA, "validation.info_provided", {"answers": [
            {"question_id": "q1", "text": {"fi": "Kokemusasiantuntijat ovat mukana jokaisessa kehittämistyöpajassa, ja "
                                                 "palautetta kerätään jokaisen valmennusjakson lopussa."}},
            {"question_id": "q2", "text": {"fi": "Kahden valmentajan työpanos ja työkokeilupaikkojen koordinointi; tilat "
                                                 "ovat kunnan omia."}},
        ]}, "answers-silta"),
        _validation(DIAK, "validation.review_submitted", {
            "scores": {"novelty": 4, "effectiveness": 3, "user_involvement": 5, "transferability": 4,
                       "sustainability": 3, "equity": 4},
            "evidence_level": 2, "recommendation": "validate",
            "comments": {"fi": "Vahva osallisuus ja selkeä kuvaus; vaikuttavuuden näyttöä kannattaa vahvistaa."},
        }, "review-diak"),
        _validation(LUT, "validation.review_submitted", {
            "scores": {"novelty": 3, "effectiveness": 3, "user_involvement": 4, "transferability": 4,
                       "sustainability": 3, "equity": 3},
            "evidence_level": 3, "recommendation": "validate",
            "comments": {"fi": "Siirrettävyys on hyvin perusteltu; kustannustiedot täydentävät arviota.",
                         "en": "Transferability is well argued; the cost information completes the picture."},
        }, "review-lut"),
    ]


COMPLETION = Offer(DIAK, event("innovation_day.registration_cancelled", DIAK,
                               {"day_id": SI_DAY, "registration_id": f"reg-{SI_DAY}-{DIAK}"}, key=f"cancel-{DIAK}"),
                   "Registrations")
"""The last event the demo offers (Diak's cancellation): once it is in the log, the demo is loaded."""


def social_innovation_day(now: datetime) -> tuple[list[Offer], datetime]:
    """The Social Innovation Day in November: a full house, a waitlist, a cancellation that
    promotes; registration closes seconds from now (returned), when the meetings are proposed."""
    deadline = now + timedelta(seconds=DAY_SECONDS)
    day = innovation_day_date(now)
    helsinki = _tz(2)  # EET in November
    starts = datetime.combine(day, time(9, 0), helsinki)
    scheduled = {
        "day_id": SI_DAY,
        "title": {"fi": f"Sosiaalisten innovaatioiden päivä {day.year}", "sv": f"Sociala innovationers dag {day.year}",
                  "en": f"Social Innovation Day {day.year}"},
        "summary": {"fi": "Foorumi sosiaalisten innovaatioiden kehittäjien ja rahoittajien kohtaamisille.",
                    "en": "A forum where developers of social innovations meet funders."},
        "format": "innovation_day", "starts_at": _iso(starts), "ends_at": _iso(starts + timedelta(hours=7)),
        "attendance_mode": "offline",
        "venue": {"name": {"fi": "Tieteiden talo", "en": "House of Science and Letters"},
                  "address": "Kirkkokatu 6, 00170 Helsinki", "municipality": "Helsinki", "country": "FI"},
        "capacity": 12, "registration_deadline": _iso(deadline),
        "themes": ["health_care", "economy.disadvantaged_groups", "migration_population", "education.lifelong_learning"],
        "languages": ["fi", "sv", "en"],
    }
    offers = [
        Offer(COMPETENCE_CENTRE, event("innovation_day.scheduled", COMPETENCE_CENTRE, scheduled), "Social Innovation Day"),
        _registration(SI_DAY, STEA, "funder", 2, interests=["health_care", "economy.disadvantaged_groups"]),
        _registration(SI_DAY, ESF_FUND, "funder", 2,
                      interests=["economy.disadvantaged_groups", "education.lifelong_learning"]),
        _registration(SI_DAY, SILTA, "innovator", 2, project_id=SILTA_PRACTICE["project_id"]),
        _registration(SI_DAY, DIAK, "innovator", 2, interests=["education.lifelong_learning", "health_care.public_health"]),
        _registration(SI_DAY, MERSIN, "innovator", 2, project_id="mersin-mahalle-mutfaklari"),
        _registration(SI_DAY, AMMAN, "innovator", 2, project_id=AMMAN_PROGRAMME["project_id"]),
        # The house is full (12 attendees): the next three wait, in order.
        _registration(SI_DAY, KUNTOUTUSSAATIO, "innovator", 2,
                      interests=["health_care.public_health", "economy.disability_participation"]),
        _registration(SI_DAY, SOSYOKENT, "innovator", 1, project_id=SOSYOKENT_PARK["project_id"]),
        _registration(SI_DAY, SOSTE, "observer", 1),
        # Diak cannot come: its two seats go to the head of the waitlist.
        COMPLETION,
    ]
    return offers, deadline


def gatherings(now: datetime) -> list[Offer]:
    """Genç İşi's training for municipalities, and a study visit of Mersin's Social Policy Tour."""
    training_start = datetime.combine(now.date() + timedelta(days=30), time(10, 0), _tz(3))
    visit_start = datetime.combine(now.date() + timedelta(days=14), time(9, 30), _tz(3))
    training = {
        "day_id": TRAINING,
        "title": {"tr": "Belediyeler İçin Sosyal Kooperatifçilik Eğitimi",
                  "en": "Social cooperatives: a training for municipalities"},
        "summary": {"tr": "Belediye çalışanları ve belediyelerle işbirliği yapmak isteyen kooperatifler için yaygın eğitim "
                          "yöntemiyle kapasite geliştirme: mal ve hizmet alımı, bağış, eşgüdüm ve ortaklık için yasal "
                          "dayanaklar, uluslararası iyi uygulamalar ve adım adım eylem planları."},
        "format": "training", "starts_at": _iso(training_start), "ends_at": _iso(training_start + timedelta(hours=6)),
        "attendance_mode": "online", "online_url": "https://egitim.example.org/genc-isi/belediyeler",
        "capacity": 30, "registration_deadline": _iso(training_start - timedelta(days=7)),
        "themes": ["economy.disadvantaged_groups", "education.lifelong_learning"], "languages": ["tr"],
    }
    visit = {
        "day_id": STUDY_VISIT,
        "title": {"tr": "Sosyal Politikalar Turu", "en": "Social Policy Tour"},
        "summary": {"tr": "Belediyeler Mersin'e gelerek Sosyal Politikalar Ofisi'nin projelerini yerinde inceliyor."},
        "format": "study_visit", "starts_at": _iso(visit_start), "ends_at": _iso(visit_start + timedelta(hours=8)),
        "attendance_mode": "offline",
        "venue": {"name": {"tr": "Mersin Büyükşehir Belediyesi Sosyal Politikalar Ofisi"}, "municipality": "Mersin",
                  "country": "TR"},
        "capacity": 40, "registration_deadline": _iso(visit_start - timedelta(days=3)),
        "themes": ["health_care", "economy", "migration_population"], "languages": ["tr"],
    }
    chapter = "Gatherings"
    return [
        Offer(GENC_ISI, event("innovation_day.scheduled", GENC_ISI, training), chapter),
        *(_registration(TRAINING, who, "observer", n)
          for who, n in ((MERSIN, 2), ("tr-tarsus-bld", 3), ("tr-cankaya-bld", 2), ("tr-nigde-bld", 2),
                         ("tr-seyhan-bld", 2), (WOMENS_COOP, 2))),
        Offer(SOCIAL_POLICY_OFFICE, event("innovation_day.scheduled", SOCIAL_POLICY_OFFICE, visit), chapter),
        *(_registration(STUDY_VISIT, who, "observer", n) for who, n in (("tr-karaman-bld", 4), ("tr-hatay-bb", 5))),
    ]


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the demo offers, in order. ``opening`` does not depend on the time; ``timed(now)``
    puts the call's and the day's deadlines a few seconds after ``now``."""

    operator: str
    http_publishers: tuple[str, ...] = field(default=(SILTA, COMPETENCE_CENTRE, LUT, DIAK))

    def opening(self) -> list[Step]:
        return [
            *(Offer(self.operator, m.joined(self.operator), "Members join") for m in MEMBERS),
            *(Offer(p["owner"], event("project.registered", p["owner"], p), "Good practices") for p in PROJECTS),
        ]

    def timed(self, now: datetime) -> list[Step]:
        now = now.replace(microsecond=0) + timedelta(seconds=1)  # whole seconds, never before ``now``
        day, day_deadline = social_innovation_day(now)
        late = _application(SILTA, LATE_APPLICATION, "120000.00", "After the call's deadline")
        return [
            *calls(now),
            *validation(now),
            *day,
            # While the deadlines approach: adoptions and gatherings need no deadline.
            *(Offer(MERSIN, adoption(*row), "Adoptions across Türkiye") for row in ADOPTIONS),
            *gatherings(now),
            WaitUntil(now + timedelta(seconds=CALL_SECONDS + 0.5), "After the call's deadline"),
            late,
            *funding_decisions(),
            WaitUntil(day_deadline, "Matchmaking at the registration deadline"),
            WaitForMeetings(SI_DAY, "Matchmaking at the registration deadline"),
        ]

    def size(self) -> int:
        """How many steps the whole demo has."""
        return len(self.opening()) + len(self.timed(datetime.now(timezone.utc)))
