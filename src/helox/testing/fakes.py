"""Realistic fake PII and secrets, drawn from a `random.Random`, for tests and benchmarks.

`fake_pii(rng, kind)` and `fake_secret(rng, kind)` give values the safety steps must catch
(card numbers with a valid Luhn digit for several brands and layouts, IBANs with valid check
digits for several countries, public IPs, tokens in each provider's format, whole private-key
blocks); `fake_invalid(rng, kind)` gives lookalikes they must not flag (a card failing Luhn, an
IBAN with wrong check digits, an IP with an octet or group out of range). Check digits are
computed here from their definitions, independently of `helox.data.safety`.

The kinds are PII_KINDS, SECRET_KINDS and INVALID_KINDS. Secret kinds are named like the secrets
step's counters (detect-secrets' type in snake case). Every secret value is entirely secret:
after replacement none of it may remain in the text.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import string
from typing import Callable

ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "-_"
HEX = "0123456789abcdef"

FIRST_NAMES = ["anna", "james", "li", "maria", "oluwaseun", "sven", "priya", "jose", "chloe",
               "mohammed", "yuki", "fatima", "noah", "ingrid", "dmitri", "aisha"]
LAST_NAMES = ["smith", "garcia", "nguyen", "müller", "okafor", "kowalski", "tanaka", "haddad",
              "johansson", "rossi", "dubois", "patel", "o'neil", "schmidt", "kim", "silva"]
MAIL_DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.uk", "proton.me", "fastmail.fm",
                "acme-corp.io", "uni-heidelberg.de", "mail.bigbank.com.au", "hotmail.fr",
                "cs.stanford.edu", "startup.ai", "gov.in"]


def _chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _digits(rng: random.Random, n: int) -> str:
    return _chars(rng, string.digits, n)


def _ascii(name: str) -> str:
    return name.replace("ü", "u").replace("'", "")


# --- PII ---------------------------------------------------------------------------------------
def fake_email(rng: random.Random) -> str:
    first, last = _ascii(rng.choice(FIRST_NAMES)), _ascii(rng.choice(LAST_NAMES))
    local = rng.choice([f"{first}.{last}", f"{first}{last}", f"{first[0]}.{last}",
                        f"{first}_{last}{rng.randint(1, 99)}", f"{first}+news", f"{first}+git",
                        f"{last}{rng.randint(1970, 2010)}", f"{first.title()}.{last.title()}"])
    return f"{local}@{rng.choice(MAIL_DOMAINS)}"


def _nanp(rng: random.Random) -> tuple[str, str, str]:
    return str(rng.randint(201, 989)), str(rng.randint(200, 999)), _digits(rng, 4)


PHONE_FORMATS: list[Callable[[random.Random], str]] = [
    lambda r: "({}) {}-{}".format(*_nanp(r)),
    lambda r: "{}-{}-{}".format(*_nanp(r)),
    lambda r: "{}.{}.{}".format(*_nanp(r)),
    lambda r: "+1 {} {} {}".format(*_nanp(r)),
    lambda r: "+1-{}-{}-{}".format(*_nanp(r)),
    lambda r: "1-{}-{}-{}".format(*_nanp(r)),
    lambda r: "+1 ({}) {}-{}".format(*_nanp(r)),
    lambda r: "+1{}{}{}".format(*_nanp(r)),
    lambda r: f"+44 20 {_digits(r, 4)} {_digits(r, 4)}",
    lambda r: f"+44 7{_digits(r, 3)} {_digits(r, 6)}",
    lambda r: f"020 {_digits(r, 4)} {_digits(r, 4)}",
    lambda r: f"07{_digits(r, 3)} {_digits(r, 6)}",
    lambda r: f"+49 30 {_digits(r, r.randint(6, 8))}",
    lambda r: f"+49 (0)89 {_digits(r, 7)}",
    lambda r: f"030 {_digits(r, 7)}",
    lambda r: f"089/{_digits(r, 8)}",
    lambda r: "+33 {} {} {} {} {}".format(r.randint(1, 9), *(_digits(r, 2) for _ in range(4))),
    lambda r: "0{} {} {} {} {}".format(r.randint(1, 9), *(_digits(r, 2) for _ in range(4))),
    lambda r: f"+81 3-{_digits(r, 4)}-{_digits(r, 4)}",
    lambda r: f"+61 2 {_digits(r, 4)} {_digits(r, 4)}",
    lambda r: f"+91 98{_digits(r, 3)} {_digits(r, 5)}",
    lambda r: f"+353 1 {_digits(r, 3)} {_digits(r, 4)}",
    lambda r: f"+55 11 9{_digits(r, 4)}-{_digits(r, 4)}",
    lambda r: f"+86 10 {_digits(r, 4)} {_digits(r, 4)}",
]


def fake_phone(rng: random.Random) -> str:
    return rng.choice(PHONE_FORMATS)(rng)


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_global and not address.is_multicast


def fake_ipv4(rng: random.Random) -> str:
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if _public(address):
            return str(address)


def fake_ipv6(rng: random.Random) -> str:
    """A global unicast (2000::/3) address, written in full, without leading zeros, or
    compressed with `::`, sometimes in capitals."""
    while True:
        groups = [rng.randint(0x2000, 0x3FFF)] + [rng.getrandbits(16) for _ in range(7)]
        if rng.random() < 0.6:  # a run of zero groups, as real addresses have
            start = rng.randint(1, 6)
            run = rng.randint(1, 7 - start)
            groups[start:start + run] = [0] * run
        address = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
        if not _public(address):
            continue
        text = rng.choice([address.exploded, address.compressed, address.compressed,
                           ":".join(f"{g:x}" for g in groups)])
        return text.upper() if rng.random() < 0.2 else text


def luhn_check_digit(payload: str) -> str:
    """The digit that makes `payload + digit` pass the Luhn test."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)  # doubled: every second digit from the check one
        total += d - 9 if d > 9 else d
    return str(-total % 10)


# (brand, IIN prefix choices, length, group sizes when printed with separators)
CARD_BRANDS = [
    ("visa", ["4"], 16, (4, 4, 4, 4)), ("visa19", ["4"], 19, (4, 4, 4, 4, 3)),
    ("mastercard", ["51", "52", "53", "54", "55"], 16, (4, 4, 4, 4)),
    ("mastercard2", [str(n) for n in range(2221, 2721)], 16, (4, 4, 4, 4)),
    ("amex", ["34", "37"], 15, (4, 6, 5)), ("discover", ["6011", "65"], 16, (4, 4, 4, 4)),
    ("jcb", [str(n) for n in range(3528, 3590)], 16, (4, 4, 4, 4)),
    ("diners", ["36", "300", "305"], 14, (4, 6, 4)), ("unionpay", ["62"], 19, (4, 4, 4, 4, 3)),
]


def _card_digits(rng: random.Random) -> tuple[str, tuple[int, ...]]:
    _, prefixes, length, groups = rng.choice(CARD_BRANDS)
    payload = rng.choice(prefixes)
    payload += _digits(rng, length - 1 - len(payload))
    return payload + luhn_check_digit(payload), groups


def _layout(rng: random.Random, digits: str, groups: tuple[int, ...]) -> str:
    separator = rng.choice(["", " ", " ", "-"])
    parts, at = [], 0
    for size in groups:
        parts.append(digits[at:at + size])
        at += size
    return separator.join(parts)


def fake_credit_card(rng: random.Random) -> str:
    digits, groups = _card_digits(rng)
    return _layout(rng, digits, groups)


# BBAN layout per country as (count, kind): n digits, a capitals, c capitals or digits.
IBAN_BBANS = {
    "DE": [(18, "n")], "GB": [(4, "a"), (14, "n")], "FR": [(10, "n"), (11, "c"), (2, "n")],
    "ES": [(20, "n")], "IT": [(1, "a"), (10, "n"), (12, "c")], "NL": [(4, "a"), (10, "n")],
    "BE": [(12, "n")], "CH": [(5, "n"), (12, "c")], "AT": [(16, "n")], "PL": [(24, "n")],
    "SE": [(20, "n")], "NO": [(11, "n")], "IE": [(4, "a"), (14, "n")], "PT": [(21, "n")],
    "DK": [(14, "n")], "LU": [(3, "n"), (13, "c")], "SA": [(2, "n"), (18, "c")],
    "BR": [(23, "n"), (1, "a"), (1, "c")],
}
BBAN_ALPHABETS = {"n": string.digits, "a": string.ascii_uppercase,
                  "c": string.ascii_uppercase + string.digits}


def iban_check_digits(country: str, bban: str) -> str:
    """ISO 7064 MOD 97-10 check digits: 98 - (BBAN + country + "00", letters as 10..35) % 97."""
    number = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{98 - int(number) % 97:02d}"


def _iban_parts(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(IBAN_BBANS))
    bban = "".join(_chars(rng, BBAN_ALPHABETS[kind], n) for n, kind in IBAN_BBANS[country])
    return country, bban


def _print_iban(rng: random.Random, compact: str) -> str:
    if rng.random() < 0.4:
        return compact
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))


def fake_iban(rng: random.Random) -> str:
    country, bban = _iban_parts(rng)
    return _print_iban(rng, country + iban_check_digits(country, bban) + bban)


# --- invalid lookalikes ------------------------------------------------------------------------
def invalid_credit_card(rng: random.Random) -> str:
    digits, groups = _card_digits(rng)
    wrong = str((int(digits[-1]) + rng.randint(1, 9)) % 10)  # any other check digit fails Luhn
    return _layout(rng, digits[:-1] + wrong, groups)


def invalid_iban(rng: random.Random) -> str:
    country, bban = _iban_parts(rng)
    right = int(iban_check_digits(country, bban))
    # Check digits are 02..98; another value in that range differs by 1..96, never 0 mod 97.
    wrong = rng.choice([n for n in range(2, 99) if n != right])
    return _print_iban(rng, f"{country}{wrong:02d}{bban}")


def invalid_ipv4(rng: random.Random) -> str:
    octets = [str(rng.randint(1, 255)) for _ in range(4)]
    octets[rng.randrange(4)] = str(rng.randint(256, 999))
    return ".".join(octets)


def invalid_ipv6(rng: random.Random) -> str:
    groups = [f"{rng.randint(0x2000, 0x3FFF):x}"] + [f"{rng.getrandbits(16):x}" for _ in range(7)]
    broken = rng.choice(["nine_groups", "long_group", "two_gaps"])
    if broken == "nine_groups":
        groups.append(f"{rng.getrandbits(16):x}")
        return ":".join(groups)
    if broken == "long_group":
        groups[rng.randint(1, 7)] = f"{rng.randint(0x10000, 0xFFFFF):x}"
        return ":".join(groups)
    return f"{groups[0]}:{groups[1]}::{groups[2]}::{groups[3]}"


# --- secrets -----------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fake_jwt(rng: random.Random) -> str:
    header = {"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
    payload = {"sub": str(rng.randint(10**6, 10**9)), "name": rng.choice(FIRST_NAMES).title(),
               "iat": rng.randint(1_500_000_000, 1_800_000_000)}
    if rng.random() < 0.5:
        payload["scope"] = rng.choice(["read:all", "admin", "repo user"])
    signature = rng.randbytes(rng.choice([32, 64, 256]))
    return ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode())
                    for part in (header, payload)) + "." + _b64url(signature)


# DER openings of each key type, so the base64 starts the way real keys do ("MIIEpAIBAAKCAQEA").
KEY_PREFIXES = {
    "RSA PRIVATE KEY": bytes.fromhex("308204a40201000282010100"),
    "PRIVATE KEY": bytes.fromhex("308204bd020100300d06092a864886f70d0101010500048204a7"),
    "EC PRIVATE KEY": bytes.fromhex("30770201010420"),
    "DSA PRIVATE KEY": bytes.fromhex("308201bb02010002818100"),
    "OPENSSH PRIVATE KEY": b"openssh-key-v1\x00\x00\x00\x00\x04none\x00\x00\x00\x04none",
}
KEY_SIZES = {"RSA PRIVATE KEY": 1190, "PRIVATE KEY": 1218, "EC PRIVATE KEY": 121,
             "DSA PRIVATE KEY": 447, "OPENSSH PRIVATE KEY": 400}


def fake_private_key(rng: random.Random) -> str:
    label = rng.choice(sorted(KEY_PREFIXES))
    prefix = KEY_PREFIXES[label]
    body = base64.b64encode(prefix + rng.randbytes(KEY_SIZES[label] - len(prefix))).decode()
    width = 70 if label.startswith("OPENSSH") else 64
    lines = [body[i:i + width] for i in range(0, len(body), width)]
    if label == "RSA PRIVATE KEY" and rng.random() < 0.3:  # legacy encrypted PEM headers
        iv = rng.randbytes(16).hex().upper()
        lines = ["Proc-Type: 4,ENCRYPTED", f"DEK-Info: AES-128-CBC,{iv}", ""] + lines
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


def fake_slack_token(rng: random.Random) -> str:
    kind = rng.choice(["bot", "user", "webhook"])
    if kind == "bot":
        return f"xoxb-{_digits(rng, 12)}-{_digits(rng, 13)}-{_chars(rng, ALNUM, 24)}"
    if kind == "user":
        return (f"xoxp-{_digits(rng, 12)}-{_digits(rng, 12)}-{_digits(rng, 13)}-"
                f"{_chars(rng, HEX, 32)}")
    upper = string.ascii_uppercase + string.digits
    return (f"https://hooks.slack.com/services/T{_chars(rng, upper, 10)}/"
            f"B{_chars(rng, upper, 10)}/{_chars(rng, ALNUM, 24)}")


def fake_openai_token(rng: random.Random) -> str:
    project = rng.choice(["", "proj-", f"proj-{_chars(rng, URLSAFE, 40)}", "svcacct-"])
    return f"sk-{project}{_chars(rng, ALNUM, 20)}T3BlbkFJ{_chars(rng, ALNUM, 20)}"


def fake_discord_bot_token(rng: random.Random) -> str:
    user_id = base64.b64encode(str(rng.randint(10**17, 10**18 - 1)).encode()).decode()
    return f"{user_id}.{_chars(rng, URLSAFE, 6)}.{_chars(rng, URLSAFE, rng.choice([27, 38]))}"


SECRET_FAKES: dict[str, Callable[[random.Random], str]] = {
    "aws_access_key": lambda r: r.choice(["AKIA", "ASIA"]) + _chars(
        r, string.ascii_uppercase + "234567", 16),
    "github_token": lambda r: r.choice(["ghp", "gho", "ghu", "ghs", "ghr"]) + "_" + _chars(
        r, ALNUM, 36),
    "gitlab_token": lambda r: r.choice(["glpat-", "gldt-", "glrt-"]) + _chars(r, URLSAFE, 20),
    "slack_token": fake_slack_token,
    "stripe_access_key": lambda r: r.choice(["sk_live_", "rk_live_"]) + _chars(
        r, ALNUM, r.choice([24, 99])),
    "json_web_token": fake_jwt,
    "private_key": fake_private_key,
    "openai_token": fake_openai_token,
    "sendgrid_api_key": lambda r: f"SG.{_chars(r, URLSAFE, 22)}.{_chars(r, URLSAFE, 43)}",
    "pypi_token": lambda r: "pypi-AgEIcHlwaS5vcmc" + _chars(r, URLSAFE, r.randint(70, 160)),
    "twilio_api_key": lambda r: r.choice(["AC", "SK"]) + _chars(r, HEX, 32),
    "discord_bot_token": fake_discord_bot_token,
    "telegram_bot_token": lambda r: f"{r.randint(10**8, 10**10 - 1)}:AA{_chars(r, URLSAFE, 33)}",
    "mailchimp_access_key": lambda r: f"{_chars(r, HEX, 32)}-us{r.randint(1, 21)}",
    "square_oauth_secret": lambda r: "sq0csp-" + _chars(r, URLSAFE, 43),
    "azure_storage_account_access_key": lambda r: "AccountKey=" + base64.b64encode(
        r.randbytes(64)).decode(),
    "artifactory_credentials": lambda r: "AKCp" + _chars(r, ALNUM, 69),
}
PII_FAKES: dict[str, Callable[[random.Random], str]] = {
    "email": fake_email, "phone": fake_phone, "ipv4": fake_ipv4, "ipv6": fake_ipv6,
    "credit_card": fake_credit_card, "iban": fake_iban,
}
INVALID_FAKES: dict[str, Callable[[random.Random], str]] = {
    "credit_card": invalid_credit_card, "iban": invalid_iban, "ipv4": invalid_ipv4,
    "ipv6": invalid_ipv6,
}
PII_KINDS = tuple(PII_FAKES)
SECRET_KINDS = tuple(SECRET_FAKES)
INVALID_KINDS = tuple(INVALID_FAKES)


def fake_pii(rng: random.Random, kind: str) -> str:
    """A valid value of PII `kind` (one of PII_KINDS)."""
    return PII_FAKES[kind](rng)


def fake_secret(rng: random.Random, kind: str) -> str:
    """A secret of `kind` (one of SECRET_KINDS); the whole string is the secret."""
    return SECRET_FAKES[kind](rng)


def fake_invalid(rng: random.Random, kind: str) -> str:
    """A lookalike of `kind` (one of INVALID_KINDS) that fails its check and is not PII."""
    return INVALID_FAKES[kind](rng)
