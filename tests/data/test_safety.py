import base64
import functools
import json
import lzma
import pickle
import random
import re
from collections import Counter

import pytest
from pydantic import ValidationError

from helox.data.document import Document
from helox.data.pipeline import StepStats, run_steps
from helox.data.safety import (DEFAULT_PII_REPLACEMENTS, PiiConfig, SecretsConfig,
                               iban_checksum_ok, luhn_ok)
from helox.testing import fakes
from helox.testing.tiny import CORPUS

PII_SENTENCES = [
    "Please contact {v} before Friday.",
    "Reach me at {v}, or leave a message with the front desk.",
    "The old record (see {v}) was wrong.",
    "Contact:\n{v}\nThanks!",
    'config = {{"value": "{v}"}}',
    "{v}",
    "name=J. Smith; value={v}; done",
    "The details you asked for are {v}.",
]
SECRET_SENTENCES = [
    "export API_TOKEN={v}\necho done",
    'config = {{"token": "{v}", "retries": 3}}',
    "Use {v} to authenticate against the staging cluster.",
    "Authorization: Bearer {v}\nAccept: */*",
    "{v}",
]
VALUES_PER_KIND = 120
# Text that looks numeric or structured but holds no PII and no secret.
TRICKY_CLEAN = [
    "The meeting is on 2024-01-15 at 10:30:45; the report is due 15.01.2024 or 01/15/2024.",
    "John 3:16 and Genesis 1:1-3; Psalm 23:1-6; Revelation 22:21; Psalm 119:105.",
    "Python 3.11.7, numpy 1.26.4, version 10.2.14.1, build 4.0.30319.42000, v1.2.3.4.",
    "Distutils accepts 2.7.2.2 and 3.1.1.6 as version numbers; OID 1.3.6.1.4.1.311.21.8.",
    "ISBN 978-3-16-148410-0, ISBN-10 0-306-40615-2, 9783161484100 and EAN 4006381333931.",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b, sha256 "
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "uuid 123e4567-e89b-12d3-a456-426614174000 and 550e8400-e29b-41d4-a716-446655440000",
    "pi = 3.14159265358979, e = 2.718281828459045, tiny 1e-10, Decimal('+35236450.6')",
    "Serve on localhost:8080 or 0.0.0.0:5000; ports 443, 8443 and 65535 are open.",
    "2**32 = 4294967296, 2**63 - 1 = 9223372036854775807, M61 = 2305843009213693951, "
    "INT_MAX is +2147483647.",
    "x = (a + b) * (c - d) / 12.5; y = 3 + 4 - 5 * 6; z = (2 + 3)(4 + 5) - 1/2",
    "Times: 12:30, 23:59:59.999, 1:02:03; scores 95.5, 87.25 and 100.0.",
    "MAC 00:1A:2B:3C:4D:5E, fingerprint 43:51:43:a1:b5:fc:8b:b7:0a:3a:a9:b1:0f:66:73:a8",
    "std::vector<int> v; a::b::c(); Foo::bar; dead::beef; Example::\n\n    code",
    "See section 4.3.2.1 of RFC 1918; 10.0.0.1, 192.168.1.1 and 127.0.0.1 are private.",
    "Documentation uses 192.0.2.17, 198.51.100.4, 203.0.113.9 and 2001:db8::8a2e:370:7334.",
    "Lines 100-200-3000 of the log; PIN pair 1234 5678; 0000 1111 2222 3333; 12-34-56.",
    "The matrix product a@b.T and x @ y; @property; decorator @functools.cache",
    "Price $1,234,567.89 and 1 234 567 items; dial 911 or 112; extension 4567.",
    "random hex 0x7fffffff 0xDEADBEEF deadbeefcafebabe; base64 aGVsbG8gd29ybGQ=",
    "IBAN-shaped: DE00 1234 5678 9012 3456 78, GB00WEST00000000000000, AB12CDEF34567890.",
    "Card-shaped: 1234 5678 9012 3456, 0000-0000-0000-0000, 4111 1111 1111 1112.",
    "Order #123-456-789 and SKU 978-0-306-40615-7; call count 555 times.",
    "The API key goes in APPLE_API_KEY; ACCOUNT settings; the word APPROVED.",
    "npm config: //registry.npmjs.org/:_authToken=${NPM_TOKEN}",
    "A JWT looks like header.payload.signature and starts with eyJ; see jwt.io.",
    "Coordinates 51.5074, -0.1278; 1.5e+10; 3.0e-5; 6.02214076e23.",
]


def doc(text: str, i: int = 0) -> Document:
    return Document(id=f"d{i}", text=text, domain="default", source="mem")


def run(config, texts: list[str]) -> tuple[list[Document], StepStats]:
    stats = StepStats(config.step)
    return list(run_steps([doc(t, i) for i, t in enumerate(texts)], [config.build()],
                          [stats])), stats


def planted(rng: random.Random, make, kind: str, sentences: list[str]) -> list[tuple[str, str]]:
    values = [make(rng, kind) for _ in range(VALUES_PER_KIND)]
    return [(v, sentences[i % len(sentences)].format(v=v)) for i, v in enumerate(values)]


@pytest.mark.parametrize("kind", fakes.PII_KINDS)
def test_every_planted_pii_value_is_replaced(kind):
    pairs = planted(random.Random(kind), fakes.fake_pii, kind, PII_SENTENCES)
    kept, stats = run(PiiConfig(), [text for _, text in pairs])
    assert stats.changed == {kind: len(pairs)}
    for (value, text), out in zip(pairs, kept):
        assert value not in out.text, (value, out.text)
        assert out.text == text.replace(value, DEFAULT_PII_REPLACEMENTS[kind])


@pytest.mark.parametrize("kind", fakes.PII_KINDS)
def test_every_planted_pii_value_drops_its_document(kind):
    pairs = planted(random.Random(kind + "drop"), fakes.fake_pii, kind, PII_SENTENCES)
    kept, stats = run(PiiConfig(policy="drop"), [text for _, text in pairs])
    assert kept == [] and stats.dropped == {f"pii_{kind}": len(pairs)}
    assert {r.detail for r in stats.removals} == {""}  # the value never reaches the report


@pytest.mark.parametrize("kind", fakes.SECRET_KINDS)
def test_every_planted_secret_is_replaced(kind):
    pairs = planted(random.Random(kind), fakes.fake_secret, kind, SECRET_SENTENCES)
    kept, stats = run(SecretsConfig(), [text for _, text in pairs])
    assert stats.changed == {kind: len(pairs)}
    for (value, text), out in zip(pairs, kept):
        assert value not in out.text and "<SECRET>" in out.text, (value, out.text)
        # Only the secret went: the sentence around it is intact.
        assert out.text == text.replace(value, "<SECRET>")


@pytest.mark.parametrize("kind", fakes.SECRET_KINDS)
def test_every_planted_secret_drops_its_document(kind):
    pairs = planted(random.Random(kind + "drop"), fakes.fake_secret, kind, SECRET_SENTENCES)
    kept, stats = run(SecretsConfig(policy="drop"), [text for _, text in pairs])
    assert kept == [] and stats.dropped == {f"secret_{kind}": len(pairs)}


@pytest.mark.parametrize("kind", fakes.INVALID_KINDS)
def test_invalid_lookalikes_are_not_flagged(kind):
    rng = random.Random(kind)
    texts = [PII_SENTENCES[i % len(PII_SENTENCES)].format(v=fakes.fake_invalid(rng, kind))
             for i in range(VALUES_PER_KIND)]
    kept, stats = run(PiiConfig(only_public_ips=False), texts)
    assert not stats.changed and [d.text for d in kept] == texts


def test_check_digits_against_published_examples():
    # Test numbers published by the card networks and IBAN examples from the ECBS / SWIFT.
    cards = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117",
             "3530111333300000", "30569309025904", "2223003122003222"]
    ibans = ["DE89370400440532013000", "GB82WEST12345698765432", "FR1420041010050500013M02606",
             "NL91ABNA0417164300", "BE68539007547034", "CH9300762011623852957"]
    assert all(luhn_ok(c) for c in cards) and all(iban_checksum_ok(i) for i in ibans)
    assert not any(luhn_ok(c[:-1] + str((int(c[-1]) + 1) % 10)) for c in cards)
    assert not any(iban_checksum_ok(i[:2] + f"{(int(i[2:4]) + 1) % 100:02d}" + i[4:])
                   for i in ibans)
    _, stats = run(PiiConfig(), [f"pay with {c} or into {i}." for c, i in zip(cards, ibans)])
    assert stats.changed == {"credit_card": 6, "iban": 6}


def test_printed_iban_followed_by_capitals_keeps_the_word():
    kept, stats = run(PiiConfig(), ["Pay BE68 5390 0754 7034 ASAP please."])
    assert kept[0].text == "Pay <IBAN> ASAP please." and stats.changed == {"iban": 1}


def test_non_public_ips_are_kept_unless_configured():
    text = TRICKY_CLEAN[14] + " " + TRICKY_CLEAN[15]
    _, default = run(PiiConfig(), [text])
    kept, every = run(PiiConfig(only_public_ips=False), [text])
    assert not default.changed
    assert every.changed == {"ipv4": 6, "ipv6": 1}
    assert "2001:db8" not in kept[0].text and "192.168.1.1" not in kept[0].text


def test_tricky_clean_text_is_not_flagged():
    for config in (PiiConfig(), SecretsConfig()):
        kept, stats = run(config, TRICKY_CLEAN)
        assert not stats.changed, (config.step, stats.changed)
        assert [d.text for d in kept] == TRICKY_CLEAN


@functools.cache
def corpus_texts() -> list[str]:
    texts = []
    for name, limit in (("train.jsonl.xz", 3000), ("val.jsonl.xz", None)):
        with lzma.open(CORPUS / name, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    break
                texts.append(json.loads(line)["text"])
    return texts


# What the scrubber finds in the bundled corpus, inspected by hand: authors' and mailing-list
# addresses in CPython docstrings, smtplib's example addresses, a Message-ID (an addr-spec),
# and the public address socket's docstring uses as an example. All are real email/IP syntax.
CORPUS_PII = Counter({
    "mal@lemburg.com": 9, "fdrake@acm.org": 1, "mhammond@skippinet.com.au": 1,
    "gward@python.net": 1, "optik-users@lists.sourceforge.net": 1, "one@one.org": 1,
    "two@two.org": 1, "three@three.org": 2, "four@four.org": 1, "me@my.org": 1, "Me@my.org": 1,
    "142480216486.20800.16526388040877946887@nightshade.la.mastaler.com": 1,
    "123.45.67.89": 2,
})


def test_corpus_findings_are_the_inspected_true_positives():
    """Over 3,134 real documents (~2 s, the slowest test here): no secret, and only the
    inspected PII above."""
    texts = corpus_texts()
    assert len(texts) > 3000
    scrubber = PiiConfig(replacements={k: "\x00" for k in fakes.PII_KINDS}).build()
    found = Counter()
    for text in texts:
        scrubbed, counts = scrubber.scrub(text)
        if counts:
            found.update(_removed(text, scrubbed))
    assert found == CORPUS_PII
    _, stats = run(SecretsConfig(), texts)
    assert not stats.changed


def _removed(original: str, scrubbed: str) -> list[str]:
    """The substrings of `original` that the NUL placeholders in `scrubbed` stand for."""
    pattern = "(.+?)".join(re.escape(piece) for piece in scrubbed.split("\x00"))
    return list(re.fullmatch(pattern, original, re.DOTALL).groups())


@pytest.mark.parametrize("policy", ["replace", "drop"])
def test_values_planted_in_corpus_documents_are_caught_and_nothing_else_changes(policy):
    rng = random.Random(policy)
    kinds = [(fakes.fake_pii, k, DEFAULT_PII_REPLACEMENTS[k]) for k in fakes.PII_KINDS]
    kinds += [(fakes.fake_secret, k, "<SECRET>") for k in fakes.SECRET_KINDS]
    originals = [t for t in corpus_texts()[:400] if "@" not in t][:len(kinds) * 4]
    planted_docs, expected = [], []
    for i, text in enumerate(originals):
        make, kind, placeholder = kinds[i % len(kinds)]
        value = make(rng, kind)
        cut = text.find("\n", len(text) // 2) % (len(text) + 1)  # a line end, or the end
        sentence = "\nYou can reach it with {} today."
        planted_docs.append(text[:cut] + sentence.format(value) + text[cut:])
        expected.append(text[:cut] + sentence.format(placeholder) + text[cut:])
    kept_pii, pii = run(PiiConfig(policy=policy), planted_docs)
    kept, secrets = run(SecretsConfig(policy=policy), [d.text for d in kept_pii])
    if policy == "drop":
        assert kept == [] and pii.docs_in == len(originals)
        assert sum(pii.dropped.values()) + sum(secrets.dropped.values()) == len(originals)
    else:
        assert [d.text for d in kept] == expected
        assert sum(pii.changed.values()) + sum(secrets.changed.values()) == len(originals)


def test_private_key_blocks_go_whole():
    rng = random.Random(3)
    key = fakes.fake_private_key(rng)
    escaped = json.dumps({"key": fakes.fake_private_key(rng)})  # one line, "\n" escapes
    truncated = "\n".join(fakes.fake_private_key(rng).splitlines()[:6])
    texts = [f"key file:\n{key}\nend of file", escaped,
             f"a truncated paste:\n{truncated}\n\nand the text goes on"]
    kept, stats = run(SecretsConfig(), texts)
    assert stats.changed == {"private_key": 3}
    assert [d.text for d in kept] == ["key file:\n<SECRET>\nend of file", '{"key": "<SECRET>"}',
                                      "a truncated paste:\n<SECRET>\n\nand the text goes on"]


def test_only_the_secret_part_of_an_assignment_or_url_goes():
    texts = ["db = 'https://admin:hunter2@db.internal:5432/app'",
             'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
             "//registry.npmjs.org/:_authToken=npm_" + "a1B2c3D4e5" * 4]
    kept, stats = run(SecretsConfig(), texts)
    assert [d.text for d in kept] == ["db = 'https://admin:<SECRET>@db.internal:5432/app'",
                                      'aws_secret_access_key = "<SECRET>"',
                                      "//registry.npmjs.org/:_authToken=<SECRET>"]
    assert stats.changed == {"basic_auth_credentials": 1, "aws_access_key": 1, "npm_tokens": 1}


def test_jwt_needs_json_header_and_payload():
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    broken = b64(b'{"alg":"HS256"') + "." + b64(b'{"sub":"1"}') + "." + b64(b"s" * 32)
    _, stats = run(SecretsConfig(plugins=["JwtTokenDetector"]), [f"token {broken} here"])
    assert not stats.changed


def test_drop_reason_is_the_first_kind_found():
    text = "Call +44 20 7946 0958 or mail ann.lee@outlook.com; key AKIAQWERTYUIOPASDFGH."
    _, pii = run(PiiConfig(policy="drop"), [text])
    _, secrets = run(SecretsConfig(policy="drop"), [text])
    assert pii.dropped == {"pii_email": 1} and secrets.dropped == {"secret_aws_access_key": 1}
    _, phones_only = run(PiiConfig(policy="drop", kinds=["phone"]), [text])
    assert phones_only.dropped == {"pii_phone": 1}


def test_replacements_per_kind():
    text = "mail ann.lee@outlook.com or call (415) 555-2671"
    kept, _ = run(PiiConfig(replacements={"email": "[email]"}), [text])
    assert kept[0].text == "mail [email] or call <PHONE>"
    with pytest.raises(ValidationError, match="itself looks like ipv4"):
        PiiConfig(replacements={"ipv4": "22.214.171.124"})


def test_config_errors_name_the_fix():
    with pytest.raises(ValidationError, match=r"unknown detect-secrets plugin\(s\) NoSuchDetector"
                                              r".*valid names: .*AWSKeyDetector"):
        SecretsConfig(plugins=["AWSKeyDetector", "NoSuchDetector"])
    with pytest.raises(ValidationError, match="KeywordDetector"):  # not regex-based
        SecretsConfig(plugins=["KeywordDetector"])
    with pytest.raises(ValidationError):
        PiiConfig(kinds=["ssn"])
    with pytest.raises(ValidationError):
        PiiConfig(kinds=[])


def test_configs_survive_pickling_for_worker_processes():
    for config in (PiiConfig(kinds=["email"], policy="drop"),
                   SecretsConfig(plugins=["AWSKeyDetector"], policy="drop")):
        step = pickle.loads(pickle.dumps(config)).build()
        kept = list(step.run([doc("x@y.com AKIAQWERTYUIOPASDFGH")], StepStats(step.name)))
        assert kept == []
