"""Code-editing tasks for benchmarks/speculative.py: a user pastes a Python function
(30 to 80 lines) and asks for a small change; the answer rewrites the function."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodeEditTask:
    """One request: the function the user pastes and the change asked for."""

    name: str
    code: str
    instruction: str

    def user_message(self) -> str:
        """The instruction, the code in a python block, and what to reply with."""
        return (
            f"{self.instruction}\n\n```python\n{self.code}```\n\n"
            "Reply with the whole updated function in one python code block."
        )


TASKS: tuple[CodeEditTask, ...] = (
    CodeEditTask(
        "parse_csv_line",
        '''def parse_csv_line(line, delimiter=","):
    """Split one CSV line into fields, honouring double quotes.

    A quoted field may contain the delimiter and doubled quotes ("")
    which stand for one quote character.
    """
    fields = []
    current = []
    in_quotes = False
    i = 0
    while i < len(line):
        char = line[i]
        if in_quotes:
            if char == '"':
                if i + 1 < len(line) and line[i + 1] == '"':
                    current.append('"')
                    i += 1
                else:
                    in_quotes = False
            else:
                current.append(char)
        elif char == '"':
            in_quotes = True
        elif char == delimiter:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    if in_quotes:
        raise ValueError("unterminated quoted field")
    fields.append("".join(current))
    return fields
''',
        "Rename the parameter `delimiter` to `separator` everywhere in this function.",
    ),
    CodeEditTask(
        "retry_with_backoff",
        '''import random
import time


def retry_with_backoff(operation, attempts=5, base_delay=0.5, max_delay=8.0):
    """Call `operation` until it succeeds, sleeping longer after each failure.

    The delay doubles after every failed attempt, up to `max_delay`, with a
    random jitter of up to half the delay so that many clients do not retry
    in lockstep. The last exception is raised if every attempt fails.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    delay = base_delay
    last_error = None
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except (ConnectionError, TimeoutError) as error:
            last_error = error
            if attempt == attempts:
                break
            jitter = random.uniform(0, delay / 2)
            time.sleep(delay + jitter)
            delay = min(delay * 2, max_delay)
    raise last_error


def is_transient(error):
    """Whether `error` is worth retrying: network trouble, not a bad request."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    status = getattr(error, "status", None)
    return status in (429, 502, 503, 504)
''',
        "Change the default number of attempts from 5 to 3.",
    ),
    CodeEditTask(
        "moving_average",
        '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` items.

    The result has len(values) - window + 1 items; each one is the mean of
    the window that ends at that position.
    """
    if window <= 0:
        raise ValueError("window must be positive")
    if window > len(values):
        return []
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result


def centered_moving_average(values, window):
    """The moving average aligned on the middle of each window (odd windows only)."""
    if window % 2 == 0:
        raise ValueError("window must be odd")
    averages = moving_average(values, window)
    padding = [None] * (window // 2)
    return padding + averages + padding


def exponential_moving_average(values, alpha):
    """Each item is alpha * value + (1 - alpha) * the previous average."""
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    result = []
    for value in values:
        result.append(value if not result else alpha * value + (1 - alpha) * result[-1])
    return result
''',
        'Change the error message "window must be positive" to "window must be a positive integer".',
    ),
    CodeEditTask(
        "inventory_report",
        '''def inventory_report(items, low_stock=5):
    """Summarise an inventory given as a list of dicts.

    Each item has "sku", "name", "quantity" and "unit_price". Returns a
    dict with the total value, the number of distinct items, the items
    that are low on stock and the items that are out of stock.
    """
    total_value = 0.0
    low = []
    out = []
    seen = set()
    for item in items:
        sku = item["sku"]
        if sku in seen:
            raise ValueError(f"duplicate sku: {sku}")
        seen.add(sku)
        quantity = item["quantity"]
        price = item["unit_price"]
        if quantity < 0:
            raise ValueError(f"negative quantity for {sku}")
        total_value += quantity * price
        if quantity == 0:
            out.append(item["name"])
        elif quantity <= low_stock:
            low.append(item["name"])
    return {
        "total_value": round(total_value, 2),
        "distinct_items": len(seen),
        "low_stock": sorted(low),
        "out_of_stock": sorted(out),
    }
''',
        "Change the default `low_stock` threshold from 5 to 10.",
    ),
    CodeEditTask(
        "binary_search_first",
        '''def binary_search_first(items, target):
    """Index of the first occurrence of `target` in the sorted list `items`.

    Returns -1 when `target` is not present. Runs in O(log n) even when
    the target occurs many times.
    """
    low = 0
    high = len(items) - 1
    found = -1
    while low <= high:
        middle = (low + high) // 2
        value = items[middle]
        if value < target:
            low = middle + 1
        elif value > target:
            high = middle - 1
        else:
            found = middle
            high = middle - 1
    return found


def binary_search_last(items, target):
    """Index of the last occurrence of `target` in the sorted list `items`, or -1."""
    low = 0
    high = len(items) - 1
    found = -1
    while low <= high:
        middle = (low + high) // 2
        value = items[middle]
        if value < target:
            low = middle + 1
        elif value > target:
            high = middle - 1
        else:
            found = middle
            low = middle + 1
    return found
''',
        "Rename the parameter `items` to `sorted_items` in both functions.",
    ),
    CodeEditTask(
        "validate_config",
        '''def validate_config(config):
    """Check a service configuration dict and return a list of problems.

    An empty list means the configuration is valid.
    """
    problems = []
    required = ["host", "port", "workers", "log_level"]
    for key in required:
        if key not in config:
            problems.append(f"missing key: {key}")
    port = config.get("port")
    if port is not None:
        if not isinstance(port, int):
            problems.append("port must be an integer")
        elif not 1 <= port <= 65535:
            problems.append("port must be between 1 and 65535")
    workers = config.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append("workers must be a positive integer")
    level = config.get("log_level")
    if level is not None and level not in ("debug", "info", "warning", "error"):
        problems.append(f"unknown log level: {level}")
    timeout = config.get("timeout", 30)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        problems.append("timeout must be a positive number")
    tls = config.get("tls", {})
    if tls.get("enabled") and not tls.get("certificate"):
        problems.append("tls is enabled but no certificate is given")
    unknown = set(config) - set(required) - {"timeout", "tls"}
    for key in sorted(unknown):
        problems.append(f"unknown key: {key}")
    return problems
''',
        'Add "critical" to the accepted log levels.',
    ),
    CodeEditTask(
        "tokenize_words",
        '''import re

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|[0-9]+(?:\\.[0-9]+)?")


def tokenize_words(text, lowercase=True, stop_words=None):
    """Split `text` into words and numbers, dropping punctuation.

    Contractions such as "don't" stay one word, and decimal numbers such
    as "3.14" stay one token. With `stop_words`, those words are removed.
    """
    if stop_words is None:
        stop_words = set()
    tokens = []
    for match in WORD.finditer(text):
        token = match.group(0)
        if lowercase:
            token = token.lower()
        if token in stop_words:
            continue
        tokens.append(token)
    return tokens


def word_frequencies(text, top=10):
    """The `top` most frequent words of `text`, as (word, count) pairs."""
    counts = {}
    for token in tokenize_words(text):
        counts[token] = counts.get(token, 0) + 1
    ranked = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))
    return ranked[:top]
''',
        "Change the default of `top` in word_frequencies from 10 to 20.",
    ),
    CodeEditTask(
        "date_range",
        '''from datetime import date, timedelta


def date_range(start, end, step_days=1, skip_weekends=False):
    """Yield the dates from `start` to `end` inclusive, `step_days` apart.

    With `skip_weekends`, Saturdays and Sundays are left out. Both bounds
    must be `datetime.date` objects and `start` must not be after `end`.
    """
    if not isinstance(start, date) or not isinstance(end, date):
        raise TypeError("start and end must be dates")
    if start > end:
        raise ValueError("start is after end")
    if step_days < 1:
        raise ValueError("step_days must be at least 1")
    current = start
    step = timedelta(days=step_days)
    while current <= end:
        if not (skip_weekends and current.weekday() >= 5):
            yield current
        current += step


def business_days_between(start, end):
    """Number of weekdays from `start` to `end`, both included."""
    return sum(1 for _ in date_range(start, end, skip_weekends=True))


def month_starts(year):
    """The first day of every month of `year`."""
    return [date(year, month, 1) for month in range(1, 13)]
''',
        "Rename the parameter `step_days` to `every_days` in date_range.",
    ),
    CodeEditTask(
        "rate_limiter",
        '''import time


class RateLimiter:
    """A token bucket: at most `rate` events per second, bursts up to `capacity`."""

    def __init__(self, rate, capacity):
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = time.monotonic()

    def _refill(self):
        now = time.monotonic()
        elapsed = now - self.updated
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now

    def try_acquire(self, cost=1):
        """Take `cost` tokens if there are enough; return whether it did."""
        self._refill()
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def wait_time(self, cost=1):
        """Seconds until `cost` tokens are available (0 if they are now)."""
        self._refill()
        missing = cost - self.tokens
        if missing <= 0:
            return 0.0
        return missing / self.rate

    def acquire(self, cost=1):
        """Block until `cost` tokens are available, then take them."""
        while not self.try_acquire(cost):
            time.sleep(self.wait_time(cost))
''',
        "Change the default `cost` of every method from 1 to 1.0.",
    ),
    CodeEditTask(
        "matrix_multiply",
        '''def matrix_multiply(a, b):
    """Multiply two matrices given as lists of rows.

    Raises ValueError when the inner dimensions do not match or a matrix
    has rows of different lengths.
    """
    if not a or not b:
        raise ValueError("matrices must not be empty")
    columns_a = len(a[0])
    if any(len(row) != columns_a for row in a):
        raise ValueError("rows of the first matrix differ in length")
    columns_b = len(b[0])
    if any(len(row) != columns_b for row in b):
        raise ValueError("rows of the second matrix differ in length")
    if columns_a != len(b):
        raise ValueError(f"cannot multiply {len(a)}x{columns_a} by {len(b)}x{columns_b}")
    result = []
    for row in a:
        out_row = []
        for j in range(columns_b):
            total = 0
            for k in range(columns_a):
                total += row[k] * b[k][j]
            out_row.append(total)
        result.append(out_row)
    return result


def identity(size):
    """The `size` x `size` identity matrix."""
    return [[1 if i == j else 0 for j in range(size)] for i in range(size)]


def transpose(matrix):
    """Rows become columns."""
    return [list(column) for column in zip(*matrix)]
''',
        "Rename the function `identity` to `identity_matrix`.",
    ),
)


if __name__ == "__main__":
    names = [task.name for task in TASKS]
    assert len(set(names)) == len(names), "task names must be unique"
    for task in TASKS:
        compile(task.code, task.name, "exec")
        lines = len(task.code.splitlines())
        assert 30 <= lines <= 80, f"{task.name}: {lines} lines"
        print(f"{task.name}: {lines} lines")
