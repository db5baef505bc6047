"""Tickets (app/tickets.py): accepted for their request until they expire, refused with the reason
otherwise, and no input makes the check raise anything but TicketError."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from app.tickets import TicketError, Tickets

NOW = 1_800_000_000.0
TICKETS = Tickets.from_token("client-token")


def test_a_ticket_admits_its_request_until_it_expires():
    ticket = TICKETS.issue("req-1", NOW + 60)
    TICKETS.check("req-1", ticket, NOW)
    TICKETS.check("req-1", ticket, NOW + 59)
    with pytest.raises(TicketError, match=r"^ticket expired"):
        TICKETS.check("req-1", ticket, NOW + 60)


def test_a_ticket_is_url_safe_and_short():
    ticket = TICKETS.issue("x" * 128, NOW + 360)
    assert re.fullmatch(r"\d+\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}", ticket) and len(ticket) < 80


def test_another_requests_ticket_is_refused_naming_the_request():
    ticket = TICKETS.issue("req-1", NOW + 60)
    with pytest.raises(TicketError, match=r"^ticket is for another request, not 'req-2'$"):
        TICKETS.check("req-2", ticket, NOW)


def test_every_gateway_with_the_same_token_accepts_it_and_another_token_does_not():
    ticket = TICKETS.issue("req-1", NOW + 60)
    Tickets.from_token("client-token").check("req-1", ticket, NOW)  # another gateway, same token
    with pytest.raises(TicketError, match=r"^invalid ticket: this gateway did not issue it"):
        Tickets.from_token("rotated-token").check("req-1", ticket, NOW)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.replace(t.split(".")[0], str(int(t.split(".")[0]) + 3600), 1),  # a later expiry
        lambda t: t[:-43] + ("A" if t[-43] != "A" else "B") + t[-42:],  # another MAC
        lambda t: t[:-1] + chr(ord(t[-1]) ^ 1),  # the same MAC bytes, maybe: base64's spare bits
        lambda t: ".".join([t.split(".")[0], TICKETS.issue("req-2", NOW).split(".")[1], t.split(".")[2]]),
    ],
    ids=["extended", "mac", "spelling", "retagged"],
)
def test_an_altered_ticket_is_invalid(change):
    with pytest.raises(TicketError, match=r"^invalid ticket"):
        TICKETS.check("req-1", change(TICKETS.issue("req-1", NOW + 60)), NOW)


@pytest.mark.parametrize("ticket", ["", "abc", "1.2", "x.y.z", "1.a.b.c", "1.a.%%%", "١٢٣.a.b", "9" * 13 + ".a.b"])
def test_a_malformed_ticket_says_so(ticket):
    with pytest.raises(TicketError, match=r"^(malformed|invalid) ticket"):
        TICKETS.check("req-1", ticket, NOW)


@given(st.text(max_size=120), st.text(st.characters(exclude_categories=()), max_size=40))
def test_no_ticket_raises_anything_but_a_ticket_error(ticket, request_id):
    try:
        TICKETS.check(request_id, ticket, NOW)
    except TicketError:
        pass
