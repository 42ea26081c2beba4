"""Deterministic synthetic scenario corpus in English and Korean, with labels that follow from the text.

Why synthetic: the trainer must be testable and demonstrable offline, and the model must have
something *learnable* — a label that is a function of the words, not noise. Every label here is
computed from the same discrete choices that produced the text:

* **judgment** (who is in the wrong) — from the *actor phrase* and whether the *action* is wrong:
  ``I <wrong action>`` → author, ``<someone> <wrong action>`` → other, ``<someone> and I both
  <wrong action>`` → everybody, a harmless action or an event nobody caused → nobody, and an
  explicitly ambiguous phrasing ("I can't tell whether it was me or X who ...") → unclear.
* **emotions** (multi-label) — the outcome sentence (e.g. "It ended badly" → sadness, "To my
  surprise, ..." → surprise) plus the narrator's perspective on the action (someone stole from me
  → anger + disgust; someone helped me → joy).
* **bentham** — the action's typical hedonic profile (intensity, duration, fecundity, purity,
  valence), adjusted by the outcome (valence, intensity, certainty), the time words (propinquity:
  "today" ≈ 0.95 … "when I was a kid" ≈ 0.05), who was affected (extent: me < one person < a group
  < a community), optional duration / importance sentences, plus ±0.03 seeded jitter.

Length carries no label signal on purpose: filler sentences, optional places and closers are drawn
independently of the labels. ~10 % of rows have no emotions, ~10 % no bentham, ~5 % no judgment and
~15 % no options, to exercise the loss masking.

Determinism: everything is drawn from one ``random.Random(seed)``, iterating only over tuples
(never sets or dicts keyed by hash), so the same (count, seed, korean_fraction) gives the same
scenarios, and ``write_jsonl`` gives the same bytes. Scenario ``i`` does not depend on ``count``
(a shorter corpus is a prefix of a longer one).

CLI: ``redheart-make-data --out data/scenarios.jsonl [--count 28882] [--seed 0] [--korean-fraction 0.3]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from redheart.cli_common import CONTEXT_SETTINGS, ExitCodeCommand
from redheart.data.schema import BENTHAM_KEYS, EMOTIONS, JUDGMENTS

__all__ = ["DEFAULT_COUNT", "generate_scenarios", "write_jsonl", "main"]

DEFAULT_COUNT = 28882
"""Default corpus size (the size of the original Red Heart scenario set)."""

_JITTER = 0.03  # ± uniform noise on every Bentham value: enough to stop exact lookup, small enough to learn


# --------------------------------------------------------------------------------------------
# Korean particles
# --------------------------------------------------------------------------------------------


def _has_final_consonant(word: str) -> bool:
    """True when the last Hangul syllable of ``word`` ends in a consonant (batchim)."""
    last = word.rstrip()[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28 != 0
    return False


def _josa(word: str, after_consonant: str, after_vowel: str) -> str:
    """Attach the right particle form: 이/가, 을/를, 은/는, 과/와 depend on the final sound."""
    return word + (after_consonant if _has_final_consonant(word) else after_vowel)


# --------------------------------------------------------------------------------------------
# Building blocks. Each is a frozen dataclass in a tuple so iteration order is fixed.
# --------------------------------------------------------------------------------------------

_NAMES_EN = (
    "Alex", "Jordan", "Sam", "Priya", "Mateo", "Chloe", "Omar", "Hana", "Lucas", "Zoe",
    "Ethan", "Maya", "Noah", "Aisha", "Leo", "Grace", "Ravi", "Elena", "Tom", "Nina",
)  # fmt: skip
_NAMES_KO = (
    "민수", "지연", "서준", "하은", "도윤", "수빈", "지훈", "예린",
    "현우", "유나", "태민", "소희", "준호", "다은", "성민", "미진",
)  # fmt: skip

_DOMAINS = ("relationships", "family", "work", "community")


@dataclass(frozen=True)
class _Person:
    """A relation phrase; ``{n}`` is replaced by a name. ``extent`` is Bentham's extent when affected."""

    domain: str
    en: str
    ko: str
    extent: float


_PEOPLE = (
    _Person("relationships", "my friend {n}", "친구 {n}", 0.25),
    _Person("relationships", "my best friend {n}", "가장 친한 친구 {n}", 0.25),
    _Person("relationships", "my roommate {n}", "룸메이트 {n}", 0.25),
    _Person("relationships", "my partner {n}", "애인 {n}", 0.22),
    _Person("family", "my sister", "언니", 0.3),
    _Person("family", "my brother", "남동생", 0.3),
    _Person("family", "my mom", "엄마", 0.3),
    _Person("family", "my dad", "아빠", 0.3),
    _Person("family", "my cousin {n}", "사촌 {n}", 0.28),
    _Person("work", "my coworker {n}", "동료 {n} 씨", 0.25),
    _Person("work", "my boss", "팀장님", 0.3),
    _Person("work", "my manager {n}", "상사 {n} 씨", 0.3),
    _Person("work", "a client", "고객", 0.22),
    _Person("community", "my neighbor {n}", "이웃 {n} 씨", 0.25),
    _Person("community", "a stranger", "낯선 사람", 0.18),
    _Person("community", "a shop owner", "가게 주인", 0.22),
    _Person("community", "my classmate {n}", "같은 반 친구 {n}", 0.25),
)

# Groups: same domains, larger extent — a community-wide act reaches the most people.
_GROUPS = (
    _Person("relationships", "my friends", "친구들", 0.5),
    _Person("relationships", "our whole friend group", "우리 친구 무리 전체", 0.55),
    _Person("family", "my whole family", "우리 가족 모두", 0.55),
    _Person("family", "my relatives", "친척들", 0.6),
    _Person("work", "my whole team", "우리 팀 전체", 0.6),
    _Person("work", "the whole office", "사무실 사람들 모두", 0.7),
    _Person("community", "the whole neighborhood", "동네 사람들 모두", 0.9),
    _Person("community", "our community", "우리 지역 사회", 0.92),
    _Person("community", "everyone in my building", "아파트 주민 모두", 0.8),
)

_ME_EXTENT = 0.1  # only the narrator affected


@dataclass(frozen=True)
class _Target:
    """A rendered affected party, with the grammatical forms the templates need."""

    en_obj: str  # "my friend Alex" / "me"
    en_pos: str  # "my friend Alex's" / "my"
    ko: str  # bare noun phrase: "친구 민수" / "나"
    extent: float
    is_me: bool = False

    def ko_forms(self) -> dict[str, str]:
        if self.is_me:
            return {"t": "나", "t_ege": "나에게", "t_reul": "나를", "t_wa": "나와", "t_ui": "내"}
        return {
            "t": self.ko,
            "t_ege": self.ko + "에게",
            "t_reul": _josa(self.ko, "을", "를"),
            "t_wa": _josa(self.ko, "과", "와"),
            "t_ui": self.ko + "의",
        }


@dataclass(frozen=True)
class _Profile:
    """An action's typical hedonic profile (Bentham values before outcome/time/scope adjustments)."""

    intensity: float
    duration: float
    fecundity: float
    purity: float
    valence: float


@dataclass(frozen=True)
class _Action:
    """Something an actor did to a target. ``wrong`` decides the judgment with the actor phrase.

    ``en``/``ko`` are past-tense predicates with target placeholders ({t}, {t_pos} / {t_ege},
    {t_reul}, {t_wa}, {t_ui}). ``victim_emotions`` are the narrator's when someone else did it
    (to them or near them); ``agent_emotions`` when the narrator did it.
    """

    key: str
    wrong: bool
    en: str
    ko: str
    profile: _Profile
    victim_emotions: tuple[str, ...]
    agent_emotions: tuple[str, ...]
    options_en: tuple[str, ...]
    options_ko: tuple[str, ...]


_WRONG_ACTIONS = (
    _Action(
        "lie",
        True,
        "lied to {t}",
        "{t_ege} 거짓말을 했다",
        _Profile(0.55, 0.5, 0.35, 0.3, -0.5),
        ("anger",),
        (),
        (
            "tell the truth",
            "admit the mistake right away",
            "say nothing until I knew more",
            "ask for more time",
        ),
        ("솔직하게 말하기", "바로 실수를 인정하기", "더 알아볼 때까지 말하지 않기", "시간을 더 달라고 하기"),
    ),
    _Action(
        "break_promise",
        True,
        "broke a promise to {t}",
        "{t_wa}의 약속을 어겼다",
        _Profile(0.5, 0.45, 0.3, 0.35, -0.45),
        ("sadness",),
        (),
        (
            "keep the promise",
            "explain early that plans changed",
            "offer another date",
            "not promise in the first place",
        ),
        ("약속을 지키기", "미리 사정을 설명하기", "다른 날짜를 제안하기", "처음부터 약속하지 않기"),
    ),
    _Action(
        "steal",
        True,
        "stole money from {t}",
        "{t_ege}서 돈을 훔쳤다",
        _Profile(0.75, 0.6, 0.4, 0.15, -0.75),
        ("anger", "disgust"),
        (),
        ("ask for a loan", "return the money", "find extra work", "talk about the money problem openly"),
        ("돈을 빌려 달라고 부탁하기", "돈을 돌려주기", "추가로 일을 구하기", "돈 문제를 솔직하게 이야기하기"),
    ),
    _Action(
        "ignore",
        True,
        "ignored {t_pos} calls",
        "{t_ui} 전화를 무시했다",
        _Profile(0.4, 0.4, 0.3, 0.4, -0.35),
        ("sadness",),
        (),
        ("call back the same day", "send a short message", "explain being busy", "answer honestly"),
        ("그날 바로 다시 전화하기", "짧게 문자라도 보내기", "바쁘다고 설명하기", "솔직하게 답하기"),
    ),
    _Action(
        "take_credit",
        True,
        "took credit for {t_pos} work",
        "{t_ui} 성과를 가로챘다",
        _Profile(0.6, 0.55, 0.35, 0.25, -0.55),
        ("anger",),
        (),
        (
            "share the credit",
            "name everyone who helped",
            "correct the record",
            "stay quiet about who did what",
        ),
        ("공을 나누기", "도와준 사람들을 모두 밝히기", "사실을 바로잡기", "누가 했는지 따지지 않기"),
    ),
    _Action(
        "insult",
        True,
        "insulted {t}",
        "{t_reul} 모욕했다",
        _Profile(0.6, 0.4, 0.35, 0.3, -0.55),
        ("anger",),
        (),
        ("take a breath first", "say it calmly", "walk away", "apologize immediately"),
        ("먼저 숨을 고르기", "차분하게 말하기", "자리를 피하기", "바로 사과하기"),
    ),
    _Action(
        "gossip",
        True,
        "spread rumors about {t}",
        "{t}에 대한 소문을 퍼뜨렸다",
        _Profile(0.55, 0.6, 0.5, 0.2, -0.5),
        ("anger", "disgust"),
        (),
        ("talk to them directly", "keep it private", "check the facts", "defend them"),
        ("직접 이야기하기", "비밀로 하기", "사실을 확인하기", "편을 들어 주기"),
    ),
    _Action(
        "snoop",
        True,
        "read {t_pos} private messages",
        "{t_ui} 개인 메시지를 몰래 읽었다",
        _Profile(0.5, 0.45, 0.3, 0.25, -0.45),
        ("disgust",),
        (),
        ("ask directly", "respect their privacy", "talk about the worry", "wait for them to share"),
        ("직접 물어보기", "사생활을 존중하기", "걱정을 털어놓기", "먼저 말해 줄 때까지 기다리기"),
    ),
)

_OK_ACTIONS = (
    _Action(
        "help",
        False,
        "helped {t}",
        "{t_reul} 도와주었다",
        _Profile(0.5, 0.5, 0.6, 0.75, 0.6),
        ("joy",),
        ("joy",),
        ("help a bit less", "suggest someone else", "pay for help instead", "say no politely"),
        ("조금만 돕기", "다른 사람을 소개하기", "대신 비용을 내 주기", "정중하게 거절하기"),
    ),
    _Action(
        "lend",
        False,
        "lent money to {t}",
        "{t_ege} 돈을 빌려주었다",
        _Profile(0.45, 0.45, 0.45, 0.6, 0.45),
        ("joy",),
        (),
        ("lend a smaller amount", "give advice instead", "set a repayment date", "decline politely"),
        ("더 적은 돈을 빌려주기", "대신 조언하기", "갚을 날짜를 정하기", "정중하게 거절하기"),
    ),
    _Action(
        "apologize",
        False,
        "apologized to {t}",
        "{t_ege} 사과했다",
        _Profile(0.45, 0.4, 0.5, 0.6, 0.35),
        ("surprise",),
        (),
        ("apologize sooner", "write a letter", "wait for a calmer moment", "explain what happened"),
        ("더 일찍 사과하기", "편지를 쓰기", "더 차분할 때 말하기", "무슨 일이 있었는지 설명하기"),
    ),
    _Action(
        "truth",
        False,
        "told {t} an uncomfortable truth",
        "{t_ege} 불편한 진실을 말했다",
        _Profile(0.55, 0.45, 0.45, 0.45, 0.15),
        (),
        (),
        ("soften the message", "wait for a better time", "say nothing", "ask someone else to tell them"),
        ("말을 부드럽게 하기", "더 좋은 때를 기다리기", "아무 말도 하지 않기", "다른 사람에게 부탁하기"),
    ),
    _Action(
        "keep_promise",
        False,
        "kept a promise to {t}",
        "{t_wa}의 약속을 지켰다",
        _Profile(0.4, 0.5, 0.55, 0.8, 0.5),
        ("joy",),
        ("joy",),
        ("cancel the plan", "renegotiate the promise", "ask for help keeping it", "keep it only partly"),
        ("계획을 취소하기", "약속을 다시 조정하기", "도움을 받아 지키기", "일부만 지키기"),
    ),
    _Action(
        "decline",
        False,
        "turned down {t_pos} invitation",
        "{t_ui} 초대를 거절했다",
        _Profile(0.3, 0.25, 0.25, 0.55, -0.1),
        (),
        (),
        ("accept the invitation", "suggest another day", "go for a short while", "explain the reason"),
        ("초대를 받아들이기", "다른 날을 제안하기", "잠깐만 들르기", "이유를 설명하기"),
    ),
    _Action(
        "cook",
        False,
        "cooked dinner for {t}",
        "{t_reul} 위해 저녁을 만들었다",
        _Profile(0.4, 0.3, 0.5, 0.85, 0.55),
        ("joy",),
        ("joy",),
        ("order food instead", "cook together", "invite more people", "make something simple"),
        ("대신 음식을 주문하기", "같이 요리하기", "사람들을 더 초대하기", "간단하게 만들기"),
    ),
    _Action(
        "donate",
        False,
        "donated to a fundraiser for {t}",
        "{t_reul} 위한 모금에 기부했다",
        _Profile(0.5, 0.55, 0.6, 0.8, 0.65),
        ("joy",),
        ("joy",),
        (
            "volunteer time instead",
            "donate anonymously",
            "organize a bigger fundraiser",
            "give a smaller amount",
        ),
        ("대신 봉사하기", "익명으로 기부하기", "더 큰 모금 행사를 열기", "더 적게 기부하기"),
    ),
)


@dataclass(frozen=True)
class _Event:
    """Something that happened without anyone doing wrong (judgment: nobody)."""

    en: str  # full clause with {t_pos}
    ko: str  # full clause with {t_ui}
    profile: _Profile
    options_en: tuple[str, ...]
    options_ko: tuple[str, ...]


_EVENTS = (
    _Event(
        "the power went out during {t_pos} birthday party",
        "{t_ui} 생일 파티 도중에 정전이 되었다",
        _Profile(0.4, 0.2, 0.2, 0.5, -0.3),
        ("bring candles", "move the party outside", "postpone the party"),
        ("양초를 준비하기", "밖으로 자리를 옮기기", "파티를 미루기"),
    ),
    _Event(
        "heavy snow ruined {t_pos} holiday plans",
        "폭설 때문에 {t_ui} 휴가 계획이 망가졌다",
        _Profile(0.45, 0.3, 0.25, 0.5, -0.35),
        ("check the forecast earlier", "book a refundable trip", "plan a backup trip"),
        ("일기 예보를 미리 확인하기", "환불 가능한 여행을 예약하기", "대체 여행을 계획하기"),
    ),
    _Event(
        "{t_pos} flight was cancelled at the last minute",
        "{t_ui} 비행기가 마지막 순간에 취소되었다",
        _Profile(0.45, 0.25, 0.2, 0.45, -0.4),
        ("book an earlier flight", "take the train", "buy travel insurance"),
        ("더 이른 비행기를 예약하기", "기차를 타기", "여행자 보험에 들기"),
    ),
    _Event(
        "a pipe burst in {t_pos} kitchen",
        "{t_ui} 부엌에서 수도관이 터졌다",
        _Profile(0.5, 0.35, 0.3, 0.45, -0.45),
        ("call a plumber sooner", "check the pipes before winter", "turn off the water"),
        ("배관공을 더 빨리 부르기", "겨울 전에 배관을 점검하기", "물을 잠그기"),
    ),
)


@dataclass(frozen=True)
class _Outcome:
    """How it turned out: sentences, the emotions they express and their Bentham adjustments."""

    key: str
    en: tuple[str, ...]
    ko: tuple[str, ...]
    emotions: tuple[str, ...]
    valence: float  # added to the action's valence
    intensity: float  # added to the action's intensity
    certainty: float  # Bentham certainty (how sure the consequence is)
    duration: float  # added to the action's duration
    fecundity: float
    purity: float


_OUTCOMES = {
    o.key: o
    for o in (
        _Outcome("good", ("It all worked out in the end.", "Afterwards we were both happy about it."),
                 ("결국 모든 것이 잘 풀렸다.", "나중에 우리 둘 다 기뻐했다."),
                 ("joy",), 0.35, 0.0, 0.85, 0.0, 0.1, 0.15),
        _Outcome("bad", ("It ended badly and we stopped talking.", "Things got much worse after that."),
                 ("결국 사이가 틀어져 연락을 끊었다.", "그 후로 상황이 훨씬 나빠졌다."),
                 ("sadness",), -0.35, 0.1, 0.85, 0.2, 0.1, -0.1),
        _Outcome("uncertain", ("I still don't know how it will turn out.", "We are all waiting to see what happens next."),
                 ("결과는 아직 기다리는 중이다.", "어떻게 될지는 두고 봐야 한다."),
                 ("fear",), -0.1, 0.0, 0.25, 0.05, 0.0, -0.1),
        _Outcome("threat", ("I'm afraid it will come back to haunt me.", "I'm scared of what might happen next."),
                 ("이 일이 나중에 문제가 될까 봐 두렵다.", "앞으로 무슨 일이 생길지 겁이 난다."),
                 ("fear",), -0.25, 0.15, 0.35, 0.1, 0.05, -0.15),
        _Outcome("surprise_good", ("Unexpectedly, it brought us closer.", "To my surprise, everyone ended up laughing about it."),
                 ("뜻밖에도 그 일로 우리는 더 가까워졌다.", "놀랍게도 다들 웃으며 넘어갔다."),
                 ("surprise", "joy"), 0.3, 0.05, 0.6, 0.0, 0.1, 0.1),
        _Outcome("surprise_bad", ("To my shock, it turned into a huge fight.", "Out of nowhere, things blew up."),
                 ("충격적이게도 그 일은 큰 싸움으로 번졌다.", "갑자기 일이 크게 터져 버렸다."),
                 ("surprise", "sadness"), -0.35, 0.2, 0.6, 0.15, 0.1, -0.15),
        _Outcome("angry", ("I'm still furious about it.", "It made me really angry."),
                 ("아직도 그 일만 생각하면 화가 난다.", "정말 화가 났다."),
                 ("anger",), -0.3, 0.2, 0.8, 0.1, 0.05, -0.1),
        _Outcome("disgust", ("Honestly, the whole thing made me feel sick.", "I found the whole thing disgusting."),
                 ("솔직히 그 일 전체가 역겹게 느껴졌다.", "정말 역겨웠다."),
                 ("disgust",), -0.3, 0.15, 0.8, 0.05, 0.0, -0.15),
        _Outcome("neutral", ("Nothing much came of it.", "Life went on as usual."),
                 ("별일 없이 지나갔다.", "그 뒤로는 평소처럼 지냈다."),
                 (), 0.0, -0.25, 0.8, -0.2, -0.1, 0.05),
    )
}  # fmt: skip

# Plausible outcomes per situation, each list drawn uniformly: the outcome is still free to vary
# within a situation, so the emotion label is not a function of the judgment alone.
_OUTCOMES_FOR = {
    "author": ("bad", "uncertain", "threat", "surprise_bad", "neutral", "surprise_good", "good"),
    "other": ("bad", "angry", "disgust", "surprise_bad", "uncertain", "neutral", "good"),
    "everybody": ("bad", "surprise_bad", "uncertain", "threat", "neutral", "good"),
    "unclear": ("bad", "angry", "uncertain", "threat", "surprise_bad", "neutral"),
    "ok_action": ("good", "surprise_good", "neutral", "bad", "uncertain", "good"),  # "good" twice: likelier
    "event": ("bad", "neutral", "surprise_good", "good", "uncertain", "angry"),
}


@dataclass(frozen=True)
class _Time:
    en: str  # "yesterday", "last week", ... (lower case; capitalised at sentence start)
    ko: str
    propinquity: float


_TIMES = (
    _Time("today", "오늘", 0.95),
    _Time("this morning", "오늘 아침", 0.95),
    _Time("yesterday", "어제", 0.85),
    _Time("last week", "지난주", 0.7),
    _Time("last month", "지난달", 0.5),
    _Time("last year", "작년", 0.3),
    _Time("a few years ago", "몇 년 전", 0.15),
    _Time("when I was a kid", "어렸을 때", 0.05),
)

_PLACES = (
    ("at work", "회사에서"),
    ("at a party", "파티에서"),
    ("at the café", "카페에서"),
    ("on a group trip", "단체 여행 중에"),
    ("at school", "학교에서"),
    ("at my cousin's wedding", "사촌 결혼식에서"),
    ("online", "온라인에서"),
    ("at the gym", "헬스장에서"),
    ("at the station", "역에서"),
)

# (sentence, mixed-in duration value): "to this day" means a long-lasting consequence.
_DURATIONS = (
    ("It only bothered me for a moment.", "잠깐 신경 쓰였을 뿐이다.", 0.1),
    ("It stayed on my mind for a few days.", "며칠 동안 계속 생각났다.", 0.35),
    ("It affected us for weeks.", "몇 주 동안 그 일의 영향을 받았다.", 0.6),
    ("It still affects me to this day.", "지금까지도 그 일이 마음에 남아 있다.", 0.9),
)

# (sentence, added intensity)
_IMPORTANCE = (
    ("It was a big deal for me.", "나에게는 아주 큰 일이었다.", 0.2),
    ("It was a small thing, really.", "사실 사소한 일이었다.", -0.2),
)

# Label-free context: chosen independently of every label so text length predicts nothing.
_FILLERS_EN = (
    "We have known each other for years.",
    "It had been a long week.",
    "I should say I'm usually pretty calm.",
    "This happened during a busy season.",
    "For context, we live in the same city.",
    "It was raining all day.",
    "Some background: money has been tight lately.",
    "We were all pretty tired.",
    "This is a throwaway account.",
    "English is not my first language, sorry.",
)
_FILLERS_KO = (
    "우리는 몇 년째 알고 지내는 사이다.",
    "그 주는 유난히 바빴다.",
    "나는 평소에 꽤 차분한 편이다.",
    "그날은 하루 종일 비가 왔다.",
    "참고로 우리는 같은 동네에 산다.",
    "요즘 돈 문제로 조금 힘들었다.",
    "다들 꽤 지쳐 있었다.",
    "글을 잘 못 쓰는 점 양해 부탁드립니다.",
)
_LEADS_EN = ("", "", "", "AITA? ", "Long story short: ", "Need outside opinions. ", "Okay, here goes. ")
_LEADS_KO = ("", "", "", "제가 잘못한 걸까요? ", "간단히 말하면, ", "조언 부탁드립니다. ")
_CLOSERS_EN = ("What do you think?", "Curious what others think.", "Thoughts?")
_CLOSERS_KO = ("어떻게 생각하세요?", "다른 분들 의견이 궁금합니다.")

# Actor kinds and their probabilities. "event" = nobody acted; "unclear" = ambiguous phrasing.
_ACTOR_KINDS = ("author", "other", "everybody", "unclear", "event")
_ACTOR_WEIGHTS = (0.38, 0.35, 0.10, 0.05, 0.12)
_P_WRONG = 0.7  # chance a (non-event, non-unclear) actor's action is a wrong one

# Label dropout rates (exercise the loss masking).
_P_NO_EMOTIONS = 0.10
_P_NO_BENTHAM = 0.10
_P_NO_JUDGMENT = 0.05
_P_NO_OPTIONS = 0.15


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _cap(text: str) -> str:
    """Capitalise the first character only ("my coworker Sam" → "My coworker Sam")."""
    return text[:1].upper() + text[1:]


def _clip(value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if value < lo else hi if value > hi else value


def _render_person(
    rng: random.Random, person: _Person, korean: bool, avoid: str | None
) -> tuple[str, str, str]:
    """Fill a relation's name slot with a name != ``avoid``; returns (english, korean, name used)."""
    names = _NAMES_KO if korean else _NAMES_EN
    name = rng.choice(names)
    while name == avoid:  # never "my friend Sam lied to my coworker Sam"
        name = rng.choice(names)
    return person.en.replace("{n}", name), person.ko.replace("{n}", name), name


def _target(
    rng: random.Random, pool: Sequence[_Person], korean: bool, avoid: str | None = None
) -> tuple[_Target, _Person]:
    """Draw an affected party from ``pool`` and render its grammatical forms."""
    person = rng.choice(pool)
    en, ko, _ = _render_person(rng, person, korean, avoid)
    plural = person in _GROUPS and en.endswith("s")  # "my friends'" not "my friends's"
    pos = en + ("'" if plural else "'s")
    return _Target(en_obj=en, en_pos=pos, ko=ko, extent=person.extent), person


_ME = _Target(en_obj="me", en_pos="my", ko="나", extent=_ME_EXTENT, is_me=True)


def _predicate(action_or_event: _Action | _Event, target: _Target, korean: bool) -> str:
    if korean:
        return action_or_event.ko.format(**target.ko_forms())
    return action_or_event.en.format(t=target.en_obj, t_pos=target.en_pos)


def _one(rng: random.Random, index: int, korean: bool) -> dict[str, Any]:
    """Draw one scenario. The order of rng calls is fixed, which is what makes output reproducible."""
    kind = rng.choices(_ACTOR_KINDS, weights=_ACTOR_WEIGHTS)[0]
    if kind in ("author", "other", "everybody"):
        wrong = rng.random() < _P_WRONG
    else:
        wrong = kind == "unclear"  # ambiguity is only about wrongdoing; events are nobody's fault
    action: _Action | _Event
    if kind == "event":
        action = rng.choice(_EVENTS)
    else:
        action = rng.choice(_WRONG_ACTIONS if wrong else _OK_ACTIONS)

    # --- who acted, who was affected ---------------------------------------------------------
    actor = ""
    actor_person: _Person | None = None
    avoid: str | None = None
    if kind in ("other", "everybody", "unclear"):
        actor_person = rng.choice(_PEOPLE)
        actor_en, actor_ko, avoid = _render_person(rng, actor_person, korean, None)
        actor = actor_ko if korean else actor_en
    if kind == "other" and rng.random() < 0.65:
        target, domain = _ME, actor_person.domain  # type: ignore[union-attr]
    elif kind in ("other", "everybody", "unclear") and rng.random() < 0.35:
        # A group from the actor's own circle (my coworker lied to my whole team).
        pool = tuple(g for g in _GROUPS if g.domain == actor_person.domain)  # type: ignore[union-attr]
        target, person = _target(rng, pool, korean)
        domain = person.domain
    elif kind == "event" and rng.random() < 0.4:
        target, domain = _ME, rng.choice(_DOMAINS)
    else:
        pool = _GROUPS if rng.random() < 0.25 else _PEOPLE
        target, person = _target(rng, pool, korean, avoid)
        domain = person.domain if actor_person is None else actor_person.domain

    # --- judgment: a pure function of the actor kind and the action's wrongness ---------------
    if kind == "unclear":
        judgment = "unclear"
    elif not wrong:
        judgment = "nobody"
    else:
        judgment = {"author": "author", "other": "other", "everybody": "everybody"}[kind]

    # --- outcome and the other text parts ----------------------------------------------------
    if kind == "event":
        outcome_pool = _OUTCOMES_FOR["event"]
    elif not wrong:
        outcome_pool = _OUTCOMES_FOR["ok_action"]
    else:
        outcome_pool = _OUTCOMES_FOR[kind]
    outcome = _OUTCOMES[rng.choice(outcome_pool)]
    outcome_sentence = rng.choice(outcome.ko if korean else outcome.en)
    time = rng.choice(_TIMES)
    place = rng.choice(_PLACES) if rng.random() < 0.6 else None
    duration = rng.choice(_DURATIONS) if rng.random() < 0.4 else None
    importance = rng.choice(_IMPORTANCE) if rng.random() < 0.3 else None
    fillers = rng.sample(_FILLERS_KO if korean else _FILLERS_EN, k=rng.choice((0, 0, 1, 1, 2, 3)))
    closer = rng.choice(_CLOSERS_KO if korean else _CLOSERS_EN) if rng.random() < 0.3 else None
    lead = rng.choice(_LEADS_KO if korean else _LEADS_EN)
    pattern = rng.randrange(3)

    predicate = _predicate(action, target, korean)
    core = (_korean_core if korean else _english_core)(kind, actor, predicate, time, place, pattern)

    extras = [outcome_sentence]
    if duration is not None:
        extras.append(duration[1] if korean else duration[0])
    if importance is not None:
        extras.append(importance[1] if korean else importance[0])
    extras.extend(fillers)
    rng.shuffle(extras)  # the outcome sentence need not be right after the action
    parts = [core, *extras]
    if closer is not None:
        parts.append(closer)
    text = lead + " ".join(parts)

    # --- emotions: outcome ∪ perspective -------------------------------------------------------
    felt = set(outcome.emotions)
    if isinstance(action, _Event):
        felt.add("sadness")  # every event here is a misfortune
    elif kind == "other":
        felt.update(action.victim_emotions)  # the narrator is on the receiving end
    elif kind == "author":
        felt.update(action.agent_emotions)
    emotions = {e: (1 if e in felt else 0) for e in EMOTIONS}

    # --- Bentham -----------------------------------------------------------------------------
    p = action.profile
    dur = p.duration + outcome.duration
    if duration is not None:
        dur = 0.4 * dur + 0.6 * duration[2]
    raw = {
        "intensity": p.intensity + outcome.intensity + (importance[2] if importance else 0.0),
        "duration": dur,
        "certainty": outcome.certainty,
        "propinquity": time.propinquity,
        "fecundity": p.fecundity + outcome.fecundity,
        "purity": p.purity + outcome.purity,
        "extent": target.extent,
        "valence": p.valence + outcome.valence,
    }
    bentham = {}
    for key in BENTHAM_KEYS:
        lo = -1.0 if key == "valence" else 0.0
        bentham[key] = round(_clip(raw[key] + rng.uniform(-_JITTER, _JITTER), lo, 1.0), 3)

    options_pool = action.options_ko if korean else action.options_en
    options = rng.sample(options_pool, k=rng.choice((2, 3)))

    lang = "ko" if korean else "en"
    record: dict[str, Any] = {
        "id": f"gen-{index:06d}",
        "text": text,
        "source": f"generated-{lang}-{domain}",
        "emotions": emotions,
        "bentham": bentham,
        "judgment": judgment,
        "options": options,
    }
    # Drop some labels (drawn for every row, so the rng stream does not depend on earlier drops).
    drops = (rng.random(), rng.random(), rng.random(), rng.random())
    if drops[0] < _P_NO_EMOTIONS:
        del record["emotions"]
    if drops[1] < _P_NO_BENTHAM:
        del record["bentham"]
    if drops[2] < _P_NO_JUDGMENT:
        del record["judgment"]
    if drops[3] < _P_NO_OPTIONS:
        del record["options"]
    return record


def _english_core(
    kind: str, actor: str, predicate: str, time: _Time, place: tuple[str, str] | None, pattern: int
) -> str:
    """The sentence that says who did what (the judgment-bearing part) in English."""
    where = f" {place[0]}" if place else ""
    if kind == "event":  # no place: "a pipe burst in my kitchen at the gym" reads badly
        if pattern == 0:
            return f"{_cap(time.en)}, {predicate}."
        return f"{_cap(predicate)} {time.en}."
    if kind == "unclear":
        if pattern == 0:
            return (
                f"{_cap(time.en)}, I honestly can't tell whether it was me or {actor} who {predicate}{where}."
            )
        if pattern == 1:
            return f"It's hard to say if it was me or {actor} who {predicate}{where} {time.en}."
        return f"{_cap(time.en)}{where}, someone {predicate}, and I can't tell whether it was me or {actor}."
    subject = {"author": "I", "other": actor, "everybody": f"{actor} and I both"}[kind]
    if pattern == 0:
        return f"{_cap(time.en)}, {subject} {predicate}{where}."
    if pattern == 1:
        return f"{_cap(subject)} {predicate}{where} {time.en}."
    if place:
        return f"{_cap(place[0])} {time.en}, {subject} {predicate}."
    return f"{_cap(subject)} {predicate} {time.en}."


def _korean_core(
    kind: str, actor: str, predicate: str, time: _Time, place: tuple[str, str] | None, pattern: int
) -> str:
    """The sentence that says who did what in Korean (plain past tense, -다 style)."""
    where = f"{place[1]} " if place else ""
    if kind == "event":
        return f"{time.ko} {predicate}."
    if kind == "unclear":
        # "-었다" → "-었는지": an embedded question ("whether ... did it").
        embedded = predicate[:-1] + "는지"
        if pattern == 0:
            return f"{time.ko} {where}누가 {embedded} 잘 모르겠다. {_josa(actor, '이었을', '였을')} 수도 있고 나였을 수도 있다."
        return f"{time.ko} {where}{actor}인지 나인지, 누가 {embedded} 확실하지 않다."
    if kind == "author":
        subject = "나는" if pattern != 2 else "내가"
    elif kind == "other":
        subject = _josa(actor, "이", "가")
    else:
        subject = f"{_josa(actor, '과', '와')} 나는 둘 다"
    if pattern == 1:
        return f"{subject} {time.ko} {where}{predicate}."
    return f"{time.ko} {where}{subject} {predicate}."


def generate_scenarios(count: int = DEFAULT_COUNT, seed: int = 0, korean_fraction: float = 0.3) -> list[dict]:
    """Generate ``count`` labeled scenarios as JSON-ready dicts (deterministic in ``seed``).

    Args:
        count: number of scenarios (>= 0).
        seed: seeds the only random source, ``random.Random(seed)``.
        korean_fraction: probability that a scenario is written in Korean, in [0, 1].

    Returns:
        Dicts with ``id``, ``text``, ``source`` and (mostly) ``emotions`` (object form),
        ``bentham`` (object form), ``judgment`` (class name) and ``options``; the schema of
        :mod:`redheart.data.schema`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if not 0.0 <= float(korean_fraction) <= 1.0:
        raise ValueError(f"korean_fraction must be in [0, 1], got {korean_fraction!r}")
    rng = random.Random(seed)
    out = []
    for index in range(count):
        korean = rng.random() < korean_fraction
        out.append(_one(rng, index, korean))
    return out


def _canonical_lines(records: Sequence[dict]) -> bytes:
    # sort_keys + fixed separators + ensure_ascii=False + "\n": the same records give the same bytes.
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def write_jsonl(
    path: str | Path, count: int = DEFAULT_COUNT, seed: int = 0, korean_fraction: float = 0.3
) -> Path:
    """Generate a corpus and write it as canonical JSON Lines (atomically: temp file + rename).

    Returns the path written. The same arguments always give the same bytes.
    """
    return _write_bytes(Path(path), _canonical_lines(generate_scenarios(count, seed, korean_fraction)))


def _write_bytes(out: Path, data: bytes) -> Path:
    """Write ``data`` to ``out`` atomically, so a crash never leaves a half-written corpus."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _summary(records: Sequence[dict]) -> str:
    """A short per-label summary so the person running the CLI sees what they got."""
    judgments = Counter(r.get("judgment", "<missing>") for r in records)
    sources = Counter(r["source"] for r in records)
    korean = sum(1 for r in records if "-ko-" in r["source"])
    lines = [
        f"  korean: {korean}  english: {len(records) - korean}",
        "  judgment: " + ", ".join(f"{k}={judgments.get(k, 0)}" for k in (*JUDGMENTS, "<missing>")),
        f"  missing labels: emotions={sum('emotions' not in r for r in records)}"
        f" bentham={sum('bentham' not in r for r in records)}",
        "  sources: " + ", ".join(f"{k}={v}" for k, v in sorted(sources.items())),
    ]
    return "\n".join(lines)


_MAKE_DATA_HELP = f"""Write a deterministic synthetic English/Korean scenario corpus (JSON Lines).

\b
Examples:
  redheart-make-data --out runs/data/scenarios.jsonl                 # the original {DEFAULT_COUNT} scenarios
  redheart-make-data --out small.jsonl --count 200 --seed 1 --korean-fraction 0.5

The same seed and count always give the same bytes. Exit codes: 0 written, 2 bad arguments."""


@click.command(cls=ExitCodeCommand, context_settings=CONTEXT_SETTINGS, help=_MAKE_DATA_HELP)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="output .jsonl file (parent dirs are created)",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=DEFAULT_COUNT,
    show_default=True,
    help="number of scenarios",
)
@click.option("--seed", type=int, default=0, show_default=True, help="random seed; same seed → same bytes")
@click.option(
    "--korean-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.3,
    show_default=True,
    help="fraction of scenarios in Korean, 0..1",
)
def make_data(out: Path, count: int, seed: int, korean_fraction: float) -> int:
    records = generate_scenarios(count, seed, korean_fraction)
    data = _canonical_lines(records)
    _write_bytes(out, data)
    digest = hashlib.sha256(data).hexdigest()[:16]
    print(f"wrote {len(records)} scenarios to {out} ({len(data)} bytes, sha256 {digest}…, seed {seed})")
    print(_summary(records))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``redheart-make-data`` entry point. Returns the process exit status."""
    from redheart.cli_common import invoke

    return invoke(make_data, argv, prog_name="redheart-make-data")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
