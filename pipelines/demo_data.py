"""Seeded demo data: support-ticket triage, written as three messy raw files in three row formats.

    python -m pipelines.demo_data --out data/raw --seed 0

The task is small enough for a 135M model to learn in minutes of CPU LoRA: a customer ticket (subject +
body) in, a compact JSON answer out, e.g. {"category": "billing", "priority": "high"}. The category
follows from the problem sentence (PROBLEMS) and the priority from one urgency sentence (PRIORITY_CUES),
always, so the label is learnable. The files are deliberately messy so every cleaning rule has work:
HTML, e-mails, phone numbers, Luhn-valid card numbers, IPv4 addresses, API keys, exact and near
duplicates, full-width / non-breaking / zero-width characters, too-short and too-long rows and ~1%
malformed JSONL.

A fourth file, tickets_preferences.jsonl, holds preference pairs for the same task on other tickets (TRL's
conversational format: prompt, chosen, rejected): chosen is the right answer, rejected a realistic mistake
(MISTAKES: the neighbouring priority, a confusable category, prose or fenced JSON instead of bare JSON); 30% are
SFT models' own failures (HARD_CUES: low and high sentences they read as medium) and 20% their contrast (a medium
sentence, a neighbour rejected), so that preference tuning has something measurable to fix on top of SFT. A few
pairs are broken on purpose (identical sides, an empty side, no prompt) for the preference-data stage's quarantine.
Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import string
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.io import atomic_open

SYSTEM = (
    'You triage customer support tickets. Reply with JSON only: {"category": one of '
    'billing|account|bug|shipping|feature_request, "priority": one of low|medium|high|urgent}.'
)
CATEGORIES = ("billing", "account", "bug", "shipping", "feature_request")
PRIORITIES = ("low", "medium", "high", "urgent")
FILES = ("tickets_helpdesk.jsonl", "tickets_legacy.csv", "tickets_export.json")
PREFERENCE_FILE = "tickets_preferences.jsonl"

# (subject, problem sentence) templates per category; {slots} are filled from FILLERS.
PROBLEMS: dict[str, list[tuple[str, str]]] = {
    "billing": [
        ("Charged twice this month", "I was charged twice for my {plan} plan this month, {amount} each time."),
        ("Wrong amount on invoice {invoice}", "Invoice {invoice} shows {amount} but my plan costs {amount2}."),
        ("Billed after cancelling", "I cancelled last week but you still billed my card {amount}."),
        ("Refund request", "Please refund the {amount} payment from {date}, I was billed by mistake."),
        ("Payment declined but money taken", "The payment was declined yet {amount} was still taken from my bank."),
        ("Subscription price went up", "Why did my subscription price go up to {amount} without any notice?"),
        ("Need a corrected invoice", "I need a corrected invoice with our VAT number for the {amount} charge."),
        ("Question about a charge", "There is a charge of {amount} on my statement that I do not recognise."),
    ],
    "account": [
        ("Cannot log in", "I can't log in since I reset my password yesterday."),
        ("Locked out", "The two-factor code never arrives, so I am locked out of my profile."),
        ("Change my email address", "Please change the email address on my login to a new one."),
        ("Delete my account", "I want to delete my account and all of my personal data."),
        ("Too many sign-in attempts", "My login got locked after too many sign-in attempts."),
        ("Add a second admin", "How do I add a second admin user to our team workspace?"),
        ("Password reset link expired", "The password reset link says it has expired every time I click it."),
        ("Username wrong", "My username changed to someone else's name and I cannot log in with mine."),
    ],
    "bug": [
        ("{app} app crashes", "The {app} app crashes as soon as I open the {page} page."),
        ("Export gives an error", "Clicking Export shows 'Error 500' and nothing downloads."),
        ("Blank screen on {page}", "The {page} page loads forever and then shows a blank screen."),
        ("Search is broken", "Search returns no results, even for items I know exist."),
        ("{button} button does nothing", "Since the latest update the {button} button does nothing."),
        ("Import fails", "CSV import fails with the error 'unexpected token' on the first line."),
        ("Charts show wrong dates", "The charts on the {page} page show data from the wrong dates, looks like a bug."),
        ("Notifications broken", "Notifications arrive twice and the unread counter is broken."),
    ],
    "shipping": [
        ("Where is my package?", "My package has not arrived, tracking {tracking} has not moved in {days} days."),
        ("Parcel arrived damaged", "The parcel arrived damaged, the box was crushed and the contents dented."),
        ("Change delivery address", "I need to change the delivery address for shipment {tracking}."),
        ("Marked delivered, not received", "The courier marked shipment {tracking} as delivered but nothing came."),
        ("Wrong item delivered", "I received the wrong item in my delivery from {date}."),
        ("Shipping time to {country}", "How long does international shipping to {country} usually take?"),
        ("Parcel stuck in customs", "The tracking page says my parcel has been stuck in customs for {days} days."),
        ("Missing package", "Only one of the two packages in shipment {tracking} was delivered."),
    ],
    "feature_request": [
        ("Dark mode please", "It would be great if you added a dark mode to the {page} page."),
        ("Export to {export}", "Could you support exporting reports to {export}?"),
        ("Integration with {tool}", "Please add an integration with {tool}, our team lives in it."),
        ("Keyboard shortcuts", "A keyboard shortcut for {action} would save us a lot of time."),
        ("Scheduled reports", "Suggestion: let us schedule reports to be sent every Monday."),
        ("Bulk editing", "We would love to see bulk editing for {things}."),
        ("Custom fields", "Feature idea: allow custom fields on the {page} page."),
        ("Feature request: templates", "Would you consider adding reusable templates for {things}?"),
    ],
}

# One of these sentences is in every ticket, and it alone decides the priority.
PRIORITY_CUES: dict[str, list[str]] = {
    "low": ["No rush at all.", "Whenever you have time.", "Just a minor thing, not urgent.",
            "Low priority for us.", "It can wait until next month."],
    "medium": ["Would be good to get this sorted this week.", "Please look into it when you can this week.",
               "It is inconvenient but we have a workaround.", "Not blocking, but it is annoying our team.",
               "A reply in the next few days would be fine."],
    "high": ["This is blocking my work today.", "I need this fixed today, please.",
             "Our team cannot work until this is resolved.", "This is important, we have a deadline tomorrow.",
             "Please prioritise this, it is holding up several colleagues."],
    "urgent": ["URGENT: we need this resolved right now.", "This is an emergency, please respond immediately.",
               "Critical issue, every minute counts, please help ASAP.",
               "Please treat this as an emergency, everyone is affected right now."],
}
# Feature requests are never emergencies; every other category takes every priority.
PRIORITY_WEIGHTS = {"low": 0.25, "medium": 0.35, "high": 0.25, "urgent": 0.15}

FILLERS: dict[str, list[str]] = {
    "plan": ["Basic", "Pro", "Team", "Enterprise"],
    "amount": ["$9.99", "$19.00", "$49.00", "$120.00", "€29.00", "£15.50"],
    "amount2": ["$9.99", "$29.00", "$39.00", "€19.00"],
    "invoice": ["INV-2024-0113", "INV-2024-0458", "INV-2025-0021", "INV-2025-0377"],
    "date": ["March 3", "last Friday", "12 May", "yesterday"],
    "app": ["iOS", "Android", "desktop", "web"],
    "page": ["settings", "reports", "dashboard", "calendar", "inbox"],
    "button": ["Save", "Share", "Send", "Archive"],
    "tracking": ["1Z999AA10123456784", "JD014600003828401", "LX123456789DE", "9400111899223197428490"],
    "days": ["3", "5", "8", "12"],
    "country": ["Canada", "Germany", "Japan", "Brazil", "Australia"],
    "export": ["PDF", "Excel", "Google Sheets"],
    "tool": ["Slack", "Jira", "Salesforce", "Zapier", "HubSpot"],
    "action": ["archiving a conversation", "switching workspaces", "assigning a ticket"],
    "things": ["contacts", "tags", "projects"],
}
OPENERS = ["Hi,", "Hello,", "Hello team,", "Hi support,", "Good morning,", "Hey there,", ""]
DETAILS = ["I'm on the {plan} plan.", "Using {browser} on {os}.", "Customer no. {customer}.", "", "", ""]
SIGN_OFFS = ["Thanks,\n{name}", "Regards, {name}", "Cheers", "Best,\n{name}", "Thank you!", ""]
NAMES = ["Anna", "Ben", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivan", "Jules", "Kofi", "Lena"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge"]
OSES = ["Windows 11", "macOS", "Ubuntu", "Android 14"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.net"]


@dataclass(frozen=True)
class Ticket:
    ticket_id: str
    subject: str
    body: str
    category: str
    priority: str

    @property
    def text(self) -> str:
        """What the customer wrote: the user message of every format."""
        return f"Subject: {self.subject}\n\n{self.body}" if self.body else self.subject

    @property
    def answer(self) -> str:
        return answer(self.category, self.priority)


def answer(category: str, priority: str) -> str:
    """The target: compact JSON with a fixed key order, e.g. {"category": "bug", "priority": "low"}."""
    return json.dumps({"category": category, "priority": priority})


def _slots(rng: random.Random) -> dict[str, str]:
    """One draw of every filler, shared by a ticket's subject and body so they agree."""
    slots = {k: rng.choice(v) for k, v in FILLERS.items()}
    return slots | {"browser": rng.choice(BROWSERS), "os": rng.choice(OSES), "name": rng.choice(NAMES),
                    "customer": str(rng.randint(10_000, 99_999))}


def _luhn_card(rng: random.Random) -> str:
    """A 16-digit Visa-like number with a valid Luhn check digit, grouped as people type it."""
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit will sit right of these, so i=0 is doubled
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    raw = "".join(map(str, digits))
    sep = rng.choice([" ", "-", ""])
    return sep.join(raw[i:i + 4] for i in range(0, 16, 4))


def _secret(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    kind = rng.choice(["sk", "hf", "aws"])
    if kind == "sk":
        return "sk-" + "".join(rng.choice(alnum) for _ in range(40))
    if kind == "hf":
        return "hf_" + "".join(rng.choice(alnum) for _ in range(34))
    return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))


def _pii_sentences(category: str, rng: random.Random) -> list[str]:
    name = rng.choice(NAMES).lower()
    sentences = []
    if rng.random() < 0.12:
        sentences.append(f"You can reach me at {name}.{rng.randint(1, 99)}@{rng.choice(DOMAINS)}.")
    if rng.random() < 0.08:
        phone = rng.choice(["+1 415-555-{:04d}", "(212) 555-{:04d}", "+44 20 7946 {:04d}", "+49 30 1234{:04d}"])
        sentences.append(f"Call me on {phone.format(rng.randint(0, 9999))}.")
    if category == "billing" and rng.random() < 0.15:
        sentences.append(f"The card is {_luhn_card(rng)}.")
    if category in ("bug", "account") and rng.random() < 0.12:
        ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        sentences.append(f"My IP address is {ip}.")
    if category == "bug" and rng.random() < 0.12:
        sentences.append(f"Here is my API key in case it helps: {_secret(rng)}")
    return sentences


def make_ticket(rng: random.Random, ticket_id: str, cue: str | None = None) -> Ticket:
    """A fresh ticket; `cue` (one of PRIORITY_CUES) fixes its urgency sentence and so its priority."""
    category = rng.choice(CATEGORIES)
    weights = {p: w for p, w in PRIORITY_WEIGHTS.items() if not (category == "feature_request" and p == "urgent")}
    if cue is None:
        priority = rng.choices(list(weights), weights=list(weights.values()))[0]
    else:
        priority = next(p for p, cues in PRIORITY_CUES.items() if cue in cues)
    subject, problem = rng.choice(PROBLEMS[category])
    if priority == "urgent" and rng.random() < 0.5:
        subject = f"URGENT: {subject}"
    slots = _slots(rng)
    middle = [problem.format(**slots), rng.choice(DETAILS).format(**slots), *_pii_sentences(category, rng)]
    middle = [s for s in middle if s]
    cue = cue if cue is not None else rng.choice(PRIORITY_CUES[priority])
    middle.insert(rng.randint(1, len(middle)), cue)  # the cue never comes first: the problem does
    opener, sign_off = rng.choice(OPENERS), rng.choice(SIGN_OFFS).format(**slots)
    body = "\n".join(part for part in (opener, " ".join(middle), sign_off) if part)
    return Ticket(ticket_id, subject.format(**slots), body, category, priority)


# --- mess: each returns a changed copy of the ticket ------------------------------------------------


def _as_html(t: Ticket, rng: random.Random) -> Ticket:
    body = t.body.replace("&", "&amp;").replace("'", "&#39;").replace("\n", "<br>\n")
    body = body.replace(". ", ".&nbsp; ", 1) if rng.random() < 0.5 else body
    return replace(t, body=f"<div class=\"ticket\"><p>{body}</p></div>")


def _fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in s)


def _unicode_oddities(t: Ticket, rng: random.Random) -> Ticket:
    kind = rng.choice(["fullwidth", "nbsp", "zero_width"])
    if kind == "fullwidth":
        return replace(t, subject=_fullwidth(t.subject))
    if kind == "nbsp":
        return replace(t, body=t.body.replace(" ", "\u00a0", 3))
    # Zero-width characters after the first line break, where no label cue word is split.
    return replace(t, body=t.body.replace("\n", "\u200b\n\u200d", 1), subject=t.subject + "\ufeff")


def _near_duplicate(t: Ticket, rng: random.Random) -> Ticket:
    """Same ticket, a word or two changed or spacing/case changed; the label cues stay intact."""
    kind = rng.choice(["opener", "spaces", "case", "sign_off"])
    if kind == "opener":
        lines = t.body.split("\n")
        lines[0] = "Hello again," if lines[0] in OPENERS else "Hi again, " + lines[0]
        return replace(t, body="\n".join(lines))
    if kind == "spaces":
        return replace(t, body="  " + t.body.replace(" ", "  ", 4) + "  ")
    if kind == "case":
        return replace(t, subject=t.subject.upper())
    return replace(t, body=t.body + "\nSent from my phone")


SHORT_TEXTS = ["?", ".", "x", "!", "-", "k"]
LONG_LOG_CHARS = 21_000  # over clean.max_chars (20,000): a whole log pasted into a ticket


def _pasted_log_ticket(rng: random.Random, ticket_id: str) -> Ticket:
    """A crash report with a full log pasted in: a bug, but too long for any training row."""
    lines, size = [], 0
    while size < LONG_LOG_CHARS:
        line = (f"2025-03-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}Z ERROR worker-{rng.randint(1, 8)} TimeoutError: upstream call timed "
                f"out after {rng.choice([5000, 15000, 30000])} ms (req {rng.getrandbits(48):012x})")
        lines.append(line)
        size += len(line) + 1
    body = "The {app} app crashes on start, full log below. This is blocking my work today.\n".format(
        app=rng.choice(FILLERS["app"])) + "\n".join(lines)
    return Ticket(ticket_id, "App crashes, log attached", body, "bug", "high")


def build_tickets(seed: int = 0, n_unique: int = 1080) -> list[tuple[str, Ticket]]:
    """(file name, ticket) in file order: unique tickets plus ~5% exact and ~5% near duplicates, a few
    too-short and two too-long ones, with HTML mostly in the web export and unicode oddities everywhere."""
    rng = random.Random(seed)
    tickets = [make_ticket(rng, f"T-{10_000 + i}") for i in range(n_unique)]
    placed: list[tuple[str, Ticket]] = []
    for t in tickets:
        name = rng.choices(FILES, weights=[0.45, 0.275, 0.275])[0]
        if rng.random() < (0.25 if name == "tickets_export.json" else 0.03):
            t = _as_html(t, rng)
        if rng.random() < 0.05:
            t = _unicode_oddities(t, rng)
        placed.append((name, t))
    extras = []
    for _ in range(n_unique // 20):  # exact duplicates: a re-export of the same ticket, maybe in another file
        name, t = rng.choice(placed)
        extras.append((name if rng.random() < 0.5 else rng.choice(FILES), t))
    for _ in range(n_unique // 20):
        name, t = rng.choice(placed)
        extras.append((name, _near_duplicate(t, rng)))
    for i, text in enumerate(SHORT_TEXTS):
        extras.append((FILES[i % 3], Ticket(f"T-9{i:04d}", text, "", rng.choice(CATEGORIES), "low")))
    extras += [("tickets_helpdesk.jsonl", _pasted_log_ticket(rng, f"T-8{i:04d}")) for i in range(2)]
    for item in extras:
        placed.insert(rng.randint(0, len(placed)), item)
    return placed


def _openai_row(t: Ticket) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t.text},
                {"role": "assistant", "content": t.answer}]
    return {"ticket_id": t.ticket_id, "category": t.category, "messages": messages}


def _malformed_lines(tickets: list[Ticket]) -> list[str]:
    """~1% broken JSONL lines, each breaking one rule of the row contract."""
    a, b, c, d, e, f = (_openai_row(t) for t in tickets[:6])
    b = {k: v for k, v in b.items() if k != "messages"}
    c["messages"][2]["role"] = "agent"
    d["messages"][1]["content"] = {"ticket": 12345}  # an object is not text (a number would be read as "12345")
    e["messages"] = e["messages"][:2]  # ends on the user: nothing to learn
    return [json.dumps(a)[:-25], json.dumps(b), json.dumps(c), json.dumps(d), json.dumps(e),
            str(f)]  # a Python dict repr: single quotes, not JSON


def render_files(seed: int = 0, n_unique: int = 1080) -> dict[str, str]:
    """File name -> file content, deterministic for a seed."""
    placed = build_tickets(seed, n_unique)
    by_file = {name: [t for n, t in placed if n == name] for name in FILES}
    rng = random.Random(seed + 1)

    lines = [json.dumps(_openai_row(t), ensure_ascii=False) for t in by_file["tickets_helpdesk.jsonl"]]
    helpdesk = by_file["tickets_helpdesk.jsonl"]
    for bad in _malformed_lines(helpdesk[7::len(helpdesk) // 6]):  # spread over the file: varied tickets
        lines.insert(rng.randint(1, len(lines)), bad)
    jsonl = "\n".join(lines) + "\n"

    buf = io.StringIO()
    writer = csv.writer(buf)  # default CRLF record ends, as legacy exports write them
    writer.writerow(["ticket_id", "category", "system", "instruction", "input", "output"])
    for t in by_file["tickets_legacy.csv"]:
        subject = f"Subject: {t.subject}" if t.body else t.subject
        writer.writerow([t.ticket_id, t.category, SYSTEM, subject, t.body, t.answer])

    export = [{"ticket_id": t.ticket_id, "category": t.category, "system": SYSTEM,
               "conversations": [{"from": "human", "value": t.text}, {"from": "gpt", "value": t.answer}]}
              for t in by_file["tickets_export.json"]]
    array = "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in export) + "\n]\n"
    return {"tickets_helpdesk.jsonl": jsonl, "tickets_legacy.csv": buf.getvalue(), "tickets_export.json": array}


# --- preference pairs --------------------------------------------------------------------------------

# The mistakes a triage model makes, and how often a rejected answer shows each (they sum to 1). Priority dominates
# because it does for the demo's SFT model: 21 of its 25 errors on the SFT test split were a wrong priority (the
# urgency cue misread), 3 a wrong category, none invalid JSON; pairs against prose or fenced JSON teach the format.
MISTAKES = {"priority": 0.75, "category": 0.15, "prose": 0.05, "fenced": 0.05}
NEIGHBOURS = {"low": ["medium"], "medium": ["low", "high"], "high": ["medium", "urgent"], "urgent": ["high"]}
# Categories a reader mixes up: a login that "does not work" reads like a bug, a missing feature like a bug, ...
CONFUSABLE = {"billing": ["account", "shipping"], "account": ["bug", "billing"], "bug": ["feature_request", "account"],
              "shipping": ["billing", "bug"], "feature_request": ["bug"]}
PROSE = ["This looks like a {category} issue with {priority} priority.",
         "Category: {category}. Priority: {priority}.",
         "I would file this under {category} and treat it as {priority} priority.",
         "The customer has a {category} problem; priority {priority}."]
N_PREFERENCE_PROMPTS = 1440  # one pair per prompt: the bootstrap over held-out pairs then resamples independent units
# Pairs mined from SFT models' failures, as a team reviewing its model's answers would collect them. Measured on two
# trainings of the demo's SFT adapter (the bundled defaults before and after a change of the split's grouping moved
# 8 of 920 training rows): the first preferred the right answer on 92-100% of the earlier preference file's pairs
# for every urgency sentence but two low ones, which it read as medium ("Whenever you have time.": 12 of 28 pairs
# right; "It can wait until next month.": 16 of 33); the second, on the SFT test split, read three high sentences as
# medium (12 of its 20 wrong answers). HARD_CUES maps each to the answer those models gave. A SFT_ERROR_SHARE of the
# prompts carry one of them with that answer rejected; a CONTRAST_SHARE carry a medium sentence with a neighbour
# (low or high) rejected, so that the pairs teach which sentence means what, not "low beats medium": without them,
# DPO on the demo moved priority accuracy on the SFT test split from 0.90 to 0.51 (exact match 0.870 -> 0.491).
HARD_CUES = {"Whenever you have time.": "medium", "It can wait until next month.": "medium",
             "I need this fixed today, please.": "medium", "This is blocking my work today.": "medium",
             "Our team cannot work until this is resolved.": "medium"}
SFT_ERROR_SHARE = 0.3
CONTRAST_SHARE = 0.2


def rejected_answer(t: Ticket, mistake: str, rng: random.Random) -> str:
    """A wrong answer to ticket `t` of the given kind of mistake (see MISTAKES)."""
    if mistake == "priority":
        return answer(t.category, rng.choice(NEIGHBOURS[t.priority]))
    if mistake == "category":
        wrong = rng.choice(CONFUSABLE[t.category])
        priority = "high" if wrong == "feature_request" and t.priority == "urgent" else t.priority
        return answer(wrong, priority)
    if mistake == "prose":
        return rng.choice(PROSE).format(category=t.category.replace("_", " "), priority=t.priority)
    return f"```json\n{t.answer}\n```"  # fenced: right values, but not the bare JSON the system prompt asks for


def preference_rows(seed: int = 0, n_prompts: int = N_PREFERENCE_PROMPTS) -> list[dict]:
    """One pair per fresh ticket (ids T-2xxxx, drawn from their own seeded stream), plus four broken pairs.

    A SFT_ERROR_SHARE of the tickets carry an urgency sentence the demo's SFT models misread (HARD_CUES, marked
    "mined": "sft_error") with their wrong answer as the rejected side, a CONTRAST_SHARE a medium sentence with a
    neighbouring priority rejected ("mined": "contrast"); the rest draw their mistake from MISTAKES ("mined": null)."""
    rng = random.Random(seed + 17)
    rows = []
    for i in range(n_prompts):
        draw = rng.random()
        mined = "sft_error" if draw < SFT_ERROR_SHARE else "contrast" if draw < SFT_ERROR_SHARE + CONTRAST_SHARE \
            else None
        cue = rng.choice(sorted(HARD_CUES)) if mined == "sft_error" \
            else rng.choice(PRIORITY_CUES["medium"]) if mined == "contrast" else None
        t = make_ticket(rng, f"T-{20_000 + i}", cue=cue)
        if rng.random() < 0.08:
            t = _as_html(t, rng)
        elif rng.random() < 0.05:
            t = _unicode_oddities(t, rng)
        mistake = "priority" if mined else rng.choices(list(MISTAKES), weights=list(MISTAKES.values()))[0]
        rejected = answer(t.category, HARD_CUES[cue]) if mined == "sft_error" \
            else answer(t.category, rng.choice(NEIGHBOURS["medium"])) if mined == "contrast" \
            else rejected_answer(t, mistake, rng)
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t.text}]
        rows.append({"ticket_id": t.ticket_id, "mistake": mistake, "mined": mined, "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": t.answer}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    broken = [dict(rows[k]) for k in (3, 50, 100, 150)]
    broken[0]["rejected"] = broken[0]["chosen"]  # identical sides
    broken[1]["rejected"] = broken[1]["chosen"]
    broken[2]["rejected"] = [{"role": "assistant", "content": ""}]  # an empty side
    broken[3] = {k: v for k, v in broken[3].items() if k != "prompt"}  # no prompt
    for row in broken:
        rows.insert(rng.randint(0, len(rows)), {**row, "ticket_id": row["ticket_id"] + "-broken"})
    return rows


def render_preference_file(seed: int = 0) -> str:
    """The preference pairs as JSONL (tickets_preferences.jsonl), deterministic for a seed."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in preference_rows(seed))


def write(out: str | Path, seed: int = 0) -> list[Path]:
    out = Path(out)
    paths = []
    for name, content in {**render_files(seed), PREFERENCE_FILE: render_preference_file(seed)}.items():
        with atomic_open(out / name, "wb") as fh:  # bytes: the CSV's CRLF record ends are kept as written
            fh.write(content.encode("utf-8"))
        paths.append(out / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/raw", help="folder to write the raw files into")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    args = parser.parse_args(argv)
    for path in write(args.out, args.seed):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
