"""Which SQL statements may run, decided by PostgreSQL's own parser.

A query runs only when PostgreSQL's parser (``pglast``, which wraps libpg_query, the
parser of the PostgreSQL server itself) proves that it is exactly one statement of a
reading kind:

* ``SELECT`` without ``INTO`` and without ``FOR UPDATE``/``FOR SHARE`` (row locks),
* ``VALUES``, ``TABLE``, ``WITH ... SELECT`` whose WITH queries all read,
* ``SHOW``,
* ``EXPLAIN`` of one of those (``EXPLAIN ANALYZE`` runs the statement it explains),

and that it calls none of the functions in :data:`DENIED_FUNCTIONS` (functions whose
effects escape a read-only, rolled-back transaction). Everything else is refused with
:class:`errors.ReadOnlyViolation` before the database sees it; a syntax error becomes a
:class:`errors.QueryError` with PostgreSQL's message, position and a caret.

The parser's verdict holds for the text it parsed, under PostgreSQL's default lexing
(``standard_conforming_strings=on``): callers check the exact text they send, after
parameters are bound, on a session with that setting.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

from pglast import parser

from errors import QueryError, ReadOnlyViolation

READ_KINDS = ("SELECT", "WITH", "VALUES", "TABLE", "SHOW", "EXPLAIN")
# Kinds PostgreSQL accepts in DECLARE CURSOR, so their rows can be fetched in batches.
CURSOR_KINDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})

# PostgreSQL commands that are not reads: refused by name even when they have a syntax
# error. Any other unknown first word is probably a typo of a read keyword.
_OTHER_COMMANDS = frozenset(
    "INSERT UPDATE DELETE MERGE TRUNCATE COPY CREATE ALTER DROP GRANT REVOKE SET RESET BEGIN START COMMIT "
    "ROLLBACK END ABORT SAVEPOINT RELEASE PREPARE EXECUTE DEALLOCATE LOCK VACUUM ANALYZE ANALYSE CLUSTER "
    "REINDEX REFRESH CALL DO LISTEN NOTIFY UNLISTEN DISCARD LOAD SECURITY COMMENT IMPORT DECLARE FETCH MOVE "
    "CLOSE CHECKPOINT REASSIGN".split()
)

_WRITE_NODES = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE"}
_OTHER_NODES = {"CreateTableAsStmt": "CREATE TABLE AS", "ExecuteStmt": "EXECUTE", "DeclareCursorStmt": "DECLARE"}
_WATCHED = frozenset([*_WRITE_NODES, "intoClause", "lockingClause", "FuncCall", "ParamRef"])
_LOCKS = {"LCS_FORUPDATE": "FOR UPDATE", "LCS_FORNOKEYUPDATE": "FOR NO KEY UPDATE",
          "LCS_FORSHARE": "FOR SHARE", "LCS_FORKEYSHARE": "FOR KEY SHARE"}

_SESSION = "changes the session beyond this query"
_SIGNALS = "acts on other sessions or on the server"
_FILES = "reads or writes files on the database server"
_REMOTE = "opens another connection, where this read-only transaction does not apply"
_HIDDEN_SQL = "runs SQL given as a string, which this check cannot see"

#: Functions refused by name (schema ignored), with the reason shown to the user. A short
#: list of the built-ins whose effects escape a read-only, rolled-back transaction; it is
#: not a sandbox: a SELECT-only role is the boundary (see the README).
DENIED_FUNCTIONS: dict[str, str] = {
    "set_config": _SESSION,
    "pg_notify": "sends a notification to other sessions",
    "pg_terminate_backend": _SIGNALS,
    "pg_cancel_backend": _SIGNALS,
    "pg_reload_conf": _SIGNALS,
    "pg_rotate_logfile": _SIGNALS,
    "pg_promote": _SIGNALS,
    "pg_switch_wal": _SIGNALS,
    "pg_log_backend_memory_contexts": _SIGNALS,
    "pg_logical_emit_message": "writes to the write-ahead log",
    "pg_drop_replication_slot": _SIGNALS,
    "pg_read_file": _FILES,
    "pg_read_binary_file": _FILES,
    "pg_stat_file": _FILES,
    "lo_import": _FILES,
    "lo_export": _FILES,
    "query_to_xml": _HIDDEN_SQL,
    "query_to_xmlschema": _HIDDEN_SQL,
    "query_to_xml_and_xmlschema": _HIDDEN_SQL,
}
#: Name prefixes refused the same way (families such as ``pg_advisory_lock_shared``).
DENIED_FUNCTION_PREFIXES: dict[str, str] = {
    "pg_advisory_": "takes an advisory lock that outlives the query",
    "pg_try_advisory_": "takes an advisory lock that outlives the query",
    "dblink": _REMOTE,
    "pg_ls_": _FILES,
    "pg_file_": _FILES,
    "pg_stat_reset": "resets server statistics, which no rollback undoes",
    "pg_create_": _SIGNALS,
    "pg_replication_origin_": _SIGNALS,
    "pg_backup_": _SIGNALS,
    "pg_wal_replay_": _SIGNALS,
}

# psycopg2's placeholders: %s, %(name)s, and %% for a literal percent sign.
_PLACEHOLDER = re.compile(r"%(?:%|s|\([^)]*\)s)")
_COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})
_QUOTED_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "UIDENT"})  # literals, U&"names"
_SEMICOLON = "ASCII_59"

_READ_HINT = "Fix: use SELECT, WITH ... SELECT, VALUES, TABLE, SHOW or EXPLAIN."
_WRITE_HINT = _READ_HINT + " To change data, use psql with a role that is allowed to write."


@dataclass(frozen=True)
class Statement:
    """One statement the guard allows.

    Attributes:
        kind: ``SELECT``, ``WITH``, ``VALUES``, ``TABLE``, ``SHOW`` or ``EXPLAIN``.
        text: the statement as it is sent: comments removed (each replaced by a space),
            no trailing semicolon. Error positions and carets refer to this text.
    """

    kind: str
    text: str

    @property
    def uses_cursor(self) -> bool:
        """Whether it can run as ``DECLARE ... CURSOR FOR`` (rows fetched in batches)."""
        return self.kind in CURSOR_KINDS


def check_statement(sql: str, *, placeholders: bool | None = None) -> Statement:
    """Return the one allowed statement in ``sql``, or raise.

    Args:
        sql: the query text.
        placeholders: how to read psycopg2 placeholders (``%s``, ``%(name)s``, ``%%``).
            False: the text is final (what is sent); True: parameters will be bound, so
            the placeholders are checked as values; None: as written, and if that does
            not parse, as values (for a check made before the parameters are known).
            Whatever this says, the text sent after binding must be checked again with
            ``placeholders=False``: a placeholder inside quotes changes the statement.

    Raises:
        QueryError: empty query, NUL character, syntax error (with position and caret).
        ReadOnlyViolation: several statements, or anything that is not an allowed read.
    """
    if "\x00" in sql:
        raise QueryError(
            "The query contains a NUL character (\\x00), which PostgreSQL does not accept in SQL text.",
            hint="Fix: remove it; pass binary values as parameters.",
        )
    pieces = _pieces(sql)
    if not pieces:
        raise QueryError(
            "The query is empty.",
            hint='Fix: give a SELECT statement, e.g. --query "SELECT * FROM customers LIMIT 10".',
        )
    if len(pieces) > 1:
        found = ", ".join(first_keyword(piece) or piece[:15] for piece in pieces)
        raise ReadOnlyViolation(
            f"Refused: the query contains {len(pieces)} statements ({found}); only one is allowed.",
            hint="Fix: send a single SELECT (a trailing semicolon is fine). "
            "Several statements could switch the transaction to read-write.",
        )
    text = pieces[0]
    node_type, node = _parse_one(text, placeholders)
    return Statement(_verdict(text, node_type, node), text)


def cursor_sql(cursor_name: str, statement: Statement) -> str:
    """``DECLARE <cursor_name> NO SCROLL CURSOR FOR <statement>``, parsed again to prove it is one statement."""
    if not statement.uses_cursor or not re.fullmatch(r"[a-z_][a-z0-9_]*", cursor_name):
        raise ValueError(f"cannot declare cursor {cursor_name!r} for a {statement.kind} statement")
    sql = f"DECLARE {cursor_name} NO SCROLL CURSOR FOR {statement.text}"
    stmts = _parse_json(sql)
    if len(stmts) != 1 or "DeclareCursorStmt" not in stmts[0]["stmt"]:
        raise ReadOnlyViolation(f"Refused: the query does not fit in one DECLARE CURSOR statement ({sql[:60]!r}).")
    return sql


def check_read_only_query(query: str) -> str:
    """Validate a user query (placeholders allowed); return its kind, e.g. ``"SELECT"``.

    Raises:
        QueryError: empty query or a syntax error.
        ReadOnlyViolation: several statements, or a statement that is not a read.
    """
    return check_statement(query).kind


def placeholders(sql: str, *, bound: bool) -> list[str]:
    """psycopg2's placeholders in ``sql``, in order: ``"%s"`` for a positional one, else the name.

    ``bound`` (parameters will be given): psycopg2 reads every ``%`` of the text it is sent,
    which is the text without its comments, so a placeholder inside a quoted string counts too.
    Not bound: psycopg2 sends the text as it is, so only what stands outside string literals,
    quoted names and comments could be meant as a placeholder. Found by PostgreSQL's lexer.
    """
    try:
        tokens = parser.scan(sql)
    except parser.ParseError:  # an unterminated literal: the statement check reports it
        tokens = []
    hidden = _COMMENT_TOKENS if bound else _COMMENT_TOKENS | _QUOTED_TOKENS
    text = list(sql)
    for token in tokens:
        quoted_name = token.name == "IDENT" and sql[token.start] == '"'
        if token.name in hidden or (quoted_name and not bound):
            text[token.start : token.end + 1] = " " * (token.end + 1 - token.start)
    found = (match.group(0) for match in _PLACEHOLDER.finditer("".join(text)))
    return [item if item == "%s" else item[2:-2] for item in found if item != "%%"]


def split_statements(sql: str) -> list[str]:
    """Split SQL into statements the way PostgreSQL's lexer does; comments are removed.

    Raises QueryError for text the lexer rejects (e.g. an unterminated quoted string).
    """
    return _pieces(sql)


def first_keyword(statement: str) -> str:
    """The statement's first word, upper-cased, skipping opening parentheses."""
    match = re.match(r"[\s(]*([A-Za-z]+)", statement)
    return match.group(1).upper() if match else ""


def caret(statement: str, position: int) -> list[str]:
    """PostgreSQL-style ``LINE n: ...`` and a caret under 1-based character ``position``."""
    before = statement[: position - 1]
    line_no = before.count("\n")
    line = statement.split("\n")[line_no]
    column = len(before) - (before.rfind("\n") + 1)
    prefix = f"LINE {line_no + 1}: "
    return [prefix + line, " " * (len(prefix) + column) + "^"]


def table_placeholder_hint(statement: str, position: int | None) -> str | None:
    """The fix when a syntax error sits on the word ``table`` (copied from an example)."""
    if position and re.match(r"(?i)table\b", statement[position - 1 :]):
        return (
            'Fix: "table" in the examples stands for your table\'s name, e.g. SELECT * FROM customers LIMIT 10.\n'
            "     List the tables: SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    return None


# --- internals ------------------------------------------------------------------------------


def _pieces(sql: str) -> list[str]:
    """The statements of ``sql`` by PostgreSQL's lexer: split at semicolons, comments replaced by spaces."""
    try:
        tokens = parser.scan(sql)
    except parser.ParseError as exc:
        raise _syntax_error(sql, exc) from None
    pieces: list[str] = []
    group: list[Any] = []
    for token in [*tokens, None]:
        if token is not None and token.name != _SEMICOLON:
            group.append(token)
            continue
        words = [t for t in group if t.name not in _COMMENT_TOKENS]
        if words:
            start, end = words[0].start, words[-1].end + 1
            text = sql[start:end]
            for comment in reversed([t for t in group if t.name in _COMMENT_TOKENS and start < t.start < end]):
                text = text[: comment.start - start] + " " + text[comment.end + 1 - start :]
            pieces.append(text)
        group = []
    return pieces


def _parse_json(sql: str) -> list[dict[str, Any]]:
    try:
        return json.loads(parser.parse_sql_json(sql))["stmts"]
    except RecursionError:
        raise QueryError(
            "The query is nested too deeply to be checked (hundreds of levels of operators or brackets).",
            hint="Fix: simplify the expression, e.g. use IN (...) or sum over an array instead of a long chain.",
        ) from None


def _parse_one(text: str, placeholders: bool | None) -> tuple[str, dict[str, Any]]:
    """(node type, node) of the single statement in ``text``; syntax errors become QueryError/ReadOnlyViolation."""
    bound = _PLACEHOLDER.sub(lambda m: "%" if m.group(0) == "%%" else "NULL", text)
    tries = {False: [text], True: [bound], None: [text, bound] if bound != text else [text]}[placeholders]
    error: parser.ParseError | None = None
    for candidate in tries:
        try:
            stmts = _parse_json(candidate)
        except parser.ParseError as exc:
            error = error or exc
            continue
        if len(stmts) != 1:  # the lexer found one statement; the parser must agree
            raise ReadOnlyViolation(f"Refused: PostgreSQL's parser reads {len(stmts)} statements here; only one is allowed.")
        ((node_type, node),) = stmts[0]["stmt"].items()
        return node_type, node
    assert error is not None
    keyword = first_keyword(text)
    if keyword in _OTHER_COMMANDS:
        raise _not_allowed(keyword)
    if keyword not in READ_KINDS:
        guess = difflib.get_close_matches(keyword, READ_KINDS, n=1)
        raise ReadOnlyViolation(
            f"Refused: the query starts with {keyword or text[:20]!r}, which is not a read statement"
            + (f" (did you mean {guess[0]}?)." if guess else "."),
            hint=_READ_HINT,
        )
    raise _syntax_error(text, error)


def _syntax_error(text: str, error: parser.ParseError) -> QueryError:
    message, location = error.args[0], error.args[1] if len(error.args) > 1 else None
    if location is None and message.endswith("at end of input"):
        location = len(text)  # where PostgreSQL puts it: just past the last character
    lines = [f"Query failed: {message} (SQLSTATE 42601)"]
    position = None
    if isinstance(location, int) and 0 <= location <= len(text):
        position = location + 1  # PostgreSQL's positions are 1-based characters
        lines.extend(caret(text, position))
    return QueryError("\n".join(lines), hint=table_placeholder_hint(text, position), sqlstate="42601",
                      position=position)


def _not_allowed(command: str) -> ReadOnlyViolation:
    return ReadOnlyViolation(f"Refused: {command} statements are not allowed; this pipeline only reads data.",
                             hint=_WRITE_HINT)


def _verdict(text: str, node_type: str, node: dict[str, Any]) -> str:
    """The statement's kind if it is an allowed read; raise ReadOnlyViolation otherwise."""
    keyword = first_keyword(text)
    if node_type == "VariableShowStmt":
        return "SHOW"
    if node_type == "ExplainStmt":
        ((inner_type, inner),) = node["query"].items()
        if inner_type != "SelectStmt":
            raise ReadOnlyViolation(
                f"Refused: EXPLAIN of {_command(inner_type, '')} is not allowed; only reads may be explained "
                "(EXPLAIN ANALYZE runs the statement it explains).",
                hint=_WRITE_HINT,
            )
        _check_reads_only(inner)
        return "EXPLAIN"
    if node_type == "SelectStmt":
        _check_reads_only(node)
        return keyword if keyword in CURSOR_KINDS else "SELECT"
    raise _not_allowed(_command(node_type, keyword))


def _command(node_type: str, keyword: str) -> str:
    if node_type in _WRITE_NODES:
        return _WRITE_NODES[node_type]
    if node_type in _OTHER_NODES:
        return _OTHER_NODES[node_type]
    return keyword or re.sub(r"Stmt$", "", node_type)


def _check_reads_only(select: dict[str, Any]) -> None:
    """Refuse writes hidden in a SELECT: data-modifying WITH, INTO, row locks, denied functions."""
    for key, value in _walk(select):
        if key in _WRITE_NODES:
            raise ReadOnlyViolation(
                f"Refused: the WITH clause contains a data-modifying statement ({_WRITE_NODES[key]}), which "
                "writes even inside a SELECT; this pipeline only reads data.",
                hint="Fix: keep only SELECTs in the WITH clause. "
                "To change data, use psql with a role that is allowed to write.",
            )
        if key == "intoClause":
            into = value.get("rel", {}).get("relname") or "a table"
            raise ReadOnlyViolation(
                f"Refused: SELECT ... INTO creates a table ({into}); this pipeline only reads data.",
                hint="Fix: remove the INTO clause to see the rows.",
            )
        if key == "lockingClause":
            strength = _LOCKS.get(value[0].get("LockingClause", {}).get("strength"), "FOR UPDATE/SHARE")
            raise ReadOnlyViolation(
                f"Refused: SELECT ... {strength} locks the rows it reads; this pipeline only reads data.",
                hint=f"Fix: remove the {strength} clause.",
            )
        if key == "FuncCall":
            _check_function(value)
        if key == "ParamRef":
            # Nothing binds $1 here (values are bound as %(name)s); refusing it also keeps the guard
            # and older servers from disagreeing about text such as "$1AS".
            number = value.get("number", 1) if isinstance(value, dict) else 1
            raise QueryError(
                f"The query uses ${number}, a positional parameter, which this tool does not bind.",
                hint="Fix: write %(name)s in the SQL and pass --param name=value (the value is bound safely).",
            )


def _check_function(call: dict[str, Any]) -> None:
    names = [part.get("String", {}).get("sval", "") for part in call.get("funcname", [])]
    name = names[-1].lower() if names else ""
    reason = DENIED_FUNCTIONS.get(name) or next(
        (why for prefix, why in DENIED_FUNCTION_PREFIXES.items() if name.startswith(prefix)), None
    )
    if reason:
        raise ReadOnlyViolation(
            f"Refused: the query calls {name}(), which {reason}; this pipeline only reads data.",
            hint="Fix: remove the call. Run administrative functions with psql, as a role allowed to.",
        )


def _walk(tree: Any) -> Iterator[tuple[str, Any]]:
    """The (key, value) pairs of the parse tree that the checks look at, without recursion."""
    stack = [tree]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            for key, value in item.items():
                if key in _WATCHED and value:
                    yield key, value
                if type(value) is dict or type(value) is list:
                    stack.append(value)
        elif type(item) is list:
            stack.extend(item)
