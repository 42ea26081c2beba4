"""Word lists of the synthetic corpus: Korean particles, names, people, times, places, fillers.

Every list is a tuple (of frozen dataclasses where a word carries a value), so iteration order is fixed
and the generator stays deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

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
