"""What happens in a scenario: actions (wrong or not), events nobody caused, and how it turned out.

Each carries the values the labels are derived from: a hedonic profile (Bentham), the narrator's
emotions, the alternative options; outcomes add their sentences, emotions and Bentham adjustments.
"""

from __future__ import annotations

from dataclasses import dataclass


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
