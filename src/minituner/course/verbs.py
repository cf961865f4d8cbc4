"""The verb tables behind the bilingual corpus: 8 irregular and 12 regular English verbs,
each with a Spanish counterpart, conjugated by person and tense.

English forms are spelled out; Spanish regular verbs are conjugated by rule and the
irregular ones are listed in full.
"""

from __future__ import annotations

from dataclasses import dataclass

IRREGULAR_VERBS = ("be", "have", "do", "go", "come", "see", "eat", "write")
REGULAR_VERBS = (
    "work", "play", "walk", "talk", "listen", "watch",
    "study", "finish", "start", "look", "want", "like",
)

# Person keys, their English and Spanish subjects.
PERSONS = ("1sg", "2sg", "3sg_m", "3sg_f", "1pl", "3pl")
SUBJECTS_EN = {"1sg": "i", "2sg": "you", "3sg_m": "he", "3sg_f": "she", "1pl": "we", "3pl": "they"}
SUBJECTS_ES = {
    "1sg": "yo", "2sg": "tú", "3sg_m": "él", "3sg_f": "ella", "1pl": "nosotros", "3pl": "ellos",
}
# Spanish person slots: 0 yo, 1 tú, 2 él/ella, 3 nosotros, 4 ellos.
_ES_SLOT = {"1sg": 0, "2sg": 1, "3sg_m": 2, "3sg_f": 2, "1pl": 3, "3pl": 4}


@dataclass(frozen=True)
class EnglishVerb:
    """English forms: base, third person singular, past simple, past participle."""

    base: str
    third: str
    past: str
    participle: str
    complements: tuple  # (english, spanish) pairs placed after the verb

    def present(self, person: str) -> str:
        """Present simple form for a person key."""
        if self.base == "be":
            return {"1sg": "am", "3sg_m": "is", "3sg_f": "is"}.get(person, "are")
        return self.third if person.startswith("3sg") else self.base

    def past_for(self, person: str) -> str:
        """Past simple form for a person key (only 'be' varies)."""
        if self.base == "be":
            return "was" if person in ("1sg", "3sg_m", "3sg_f") else "were"
        return self.past


@dataclass(frozen=True)
class SpanishVerb:
    """Spanish forms: infinitive, present, preterite, future (5 slots each), participle."""

    infinitive: str
    present: tuple
    preterite: tuple
    future: tuple
    participle: str


def _regular_es(infinitive: str) -> SpanishVerb:
    """Conjugate a regular -ar/-er/-ir verb."""
    stem, ending = infinitive[:-2], infinitive[-2:]
    if ending == "ar":
        present = ("o", "as", "a", "amos", "an")
        preterite = ("é", "aste", "ó", "amos", "aron")
        participle = stem + "ado"
    else:
        present = ("o", "es", "e", "emos" if ending == "er" else "imos", "en")
        preterite = ("í", "iste", "ió", "imos", "ieron")
        participle = stem + "ido"
    future = tuple(infinitive + e for e in ("é", "ás", "á", "emos", "án"))
    return SpanishVerb(
        infinitive,
        tuple(stem + e for e in present),
        tuple(stem + e for e in preterite),
        future,
        participle,
    )


def regular_spanish(infinitive: str) -> SpanishVerb:
    """A Spanish verb conjugated by the regular rule (the learner's over-regularisation)."""
    return _regular_es(infinitive)


def _es(inf, present, preterite, future_stem, participle) -> SpanishVerb:
    future = tuple(future_stem + e for e in ("é", "ás", "á", "emos", "án"))
    return SpanishVerb(inf, tuple(present.split()), tuple(preterite.split()), future, participle)


SPANISH = {
    "be": _es("estar", "estoy estás está estamos están",
              "estuve estuviste estuvo estuvimos estuvieron", "estar", "estado"),
    "have": _es("tener", "tengo tienes tiene tenemos tienen",
                "tuve tuviste tuvo tuvimos tuvieron", "tendr", "tenido"),
    "do": _es("hacer", "hago haces hace hacemos hacen",
              "hice hiciste hizo hicimos hicieron", "har", "hecho"),
    "go": _es("ir", "voy vas va vamos van", "fui fuiste fue fuimos fueron", "ir", "ido"),
    "come": _es("venir", "vengo vienes viene venimos vienen",
                "vine viniste vino vinimos vinieron", "vendr", "venido"),
    "see": _es("ver", "veo ves ve vemos ven", "vi viste vio vimos vieron", "ver", "visto"),
    "eat": _regular_es("comer"),
    "write": _es("escribir", "escribo escribes escribe escribimos escriben",
                 "escribí escribiste escribió escribimos escribieron", "escribir", "escrito"),
    "work": _regular_es("trabajar"),
    "play": _es("jugar", "juego juegas juega jugamos juegan",
                "jugué jugaste jugó jugamos jugaron", "jugar", "jugado"),
    "walk": _regular_es("caminar"),
    "talk": _regular_es("hablar"),
    "listen": _regular_es("escuchar"),
    "watch": _regular_es("mirar"),
    "study": _regular_es("estudiar"),
    "finish": _regular_es("terminar"),
    "start": _es("empezar", "empiezo empiezas empieza empezamos empiezan",
                 "empecé empezaste empezó empezamos empezaron", "empezar", "empezado"),
    "look": _regular_es("buscar"),
    "want": _es("querer", "quiero quieres quiere queremos quieren",
                "quise quisiste quiso quisimos quisieron", "querr", "querido"),
    "like": _regular_es("disfrutar"),
}
# Auxiliaries: haber (perfect) and poder (can + infinitive).
HABER = ("he", "has", "ha", "hemos", "han")
PODER = ("puedo", "puedes", "puede", "podemos", "pueden")


def _ed(base: str) -> str:
    """The regular -ed past of a base form (study -> studied, like -> liked)."""
    if base.endswith("e"):
        return base + "d"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ied"
    return base + "ed"


def _third(base: str) -> str:
    """The regular third-person -s form (watch -> watches, study -> studies)."""
    if base.endswith(("ch", "sh", "s", "x", "o")):
        return base + "es"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ies"
    return base + "s"


def _regular_en(base: str, complements: tuple) -> EnglishVerb:
    return EnglishVerb(base, _third(base), _ed(base), _ed(base), complements)


ENGLISH = {
    "be": EnglishVerb("be", "is", "was", "been", (("here", "aquí"), ("at home", "en casa"))),
    "have": EnglishVerb("have", "has", "had", "had", (("a dog", "un perro"), ("time", "tiempo"))),
    "do": EnglishVerb("do", "does", "did", "done",
                      (("the work", "el trabajo"), ("it well", "bien"))),
    "go": EnglishVerb("go", "goes", "went", "gone", (("home", "a casa"), ("out", "fuera"))),
    "come": EnglishVerb("come", "comes", "came", "come", (("home", "a casa"), ("here", "aquí"))),
    "see": EnglishVerb("see", "sees", "saw", "seen",
                       (("the sea", "el mar"), ("a film", "un filme"))),
    "eat": EnglishVerb("eat", "eats", "ate", "eaten", (("bread", "pan"), ("fish", "pescado"))),
    "write": EnglishVerb("write", "writes", "wrote", "written",
                         (("a letter", "una carta"), ("a poem", "un poema"))),
    "work": _regular_en("work", (("hard", "mucho"), ("at home", "en casa"))),
    "play": _regular_en("play", (("chess", "ajedrez"), ("football", "fútbol"))),
    "walk": _regular_en("walk", (("home", "a casa"), ("fast", "rápido"))),
    "talk": _regular_en("talk", (("a lot", "mucho"), ("slowly", "despacio"))),
    "listen": _regular_en("listen", (("to music", "música"), ("to me", "a mí"))),
    "watch": _regular_en("watch", (("tv", "la tele"), ("the game", "el partido"))),
    "study": _regular_en("study", (("math", "mates"), ("at night", "de noche"))),
    "finish": _regular_en("finish", (("the book", "el libro"), ("early", "pronto"))),
    "start": _regular_en("start", (("the class", "la clase"), ("early", "pronto"))),
    "look": _regular_en("look", (("for a job", "trabajo"), ("for it", "eso"))),
    "want": _regular_en("want", (("more", "más"), ("a car", "un coche"))),
    "like": _regular_en("like", (("music", "la música"), ("the film", "el filme"))),
}


def overregularised_past(verb: str) -> str:
    """The -ed form a learner wrongly builds for a verb (go -> goed, eat -> eated)."""
    base = ENGLISH[verb].base
    return base + "d" if base.endswith("e") and verb != "be" else base + "ed"


def is_irregular(verb: str) -> bool:
    """True for the 8 irregular verbs of the experiment."""
    return verb in IRREGULAR_VERBS


def spanish_slot(person: str) -> int:
    """Index into a Spanish conjugation tuple for a person key."""
    return _ES_SLOT[person]
