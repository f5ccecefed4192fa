"""Benchmark prompt_builder: budgeted prompts from 1k / 10k / 200k rows.

Run from the repository root::

    python bench/bench_prompt_builder.py

Builds prompts under the default budget (16,384-token context minus
MAX_NEW_TOKENS 512) from realistic shop order/review rows and prints the median
time of several runs for each size, the rows shown, and for comparison the
throughput of formatting without a budget. Last, 20,000 rows split into
4,000-token prompts by the row packer, as map-reduce will. Each build runs twice: counting
with the real cl100k tokenizer (the default counter; its vocabulary is loaded
before timing) and with the estimate; "real tokens" is the cl100k count of
the prompt either way.
"""

from __future__ import annotations

import datetime
import decimal
import math
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prompt_builder  # noqa: E402
import row_packer  # noqa: E402
import token_count  # noqa: E402
import value_format  # noqa: E402

SURNAMES = "김이박최정강조윤장임한오서신권황안송류전홍고문양손배백허유남심노하곽성차주우구민진지엄채원천방공현함변염"
GIVEN = [
    "민준", "서연", "지훈", "하은", "도윤", "서준", "예린", "지우", "수아", "은찬",
    "가을", "슬기", "혜숙", "영수", "미경", "동현", "지민", "채원", "현우", "다은",
]
PRODUCTS = [
    "무선 마우스", "기계식 키보드", "노트북 거치대", "블루투스 스피커", "USB-C 충전기 65W", "27인치 모니터",
    "Wireless Mouse M720", "Noise Cancelling Headphones", "스마트워치 밴드", "HDMI 케이블 2m", "휴대용 SSD 1TB",
]
REVIEWS_KO = [
    "배송이 빠르고 포장도 꼼꼼했어요. 다음에도 구매할게요!", "생각보다 사이즈가 작아서 교환 신청했습니다.",
    "가격 대비 품질이 좋아요. 추천합니다 👍", "색상이 사진과 조금 달라요. 그래도 만족합니다.",
    "두 번째 구매인데 역시 좋네요. 가족들도 좋아해요 😀", "배터리가 금방 닳아요. 환불 요청합니다.",
    "소리가 깨끗하고 노이즈 캔슬링이 훌륭합니다.", "설명서가 영어로만 되어 있어서 불편했어요.",
]
REVIEWS_EN = [
    "Fast delivery and careful packaging. Will buy again!", "Smaller than expected, so I asked for an exchange.",
    "Great value for the price | works with my Mac too.", "Battery drains quickly.\nRequesting a refund.",
    "Sound is clean; the noise cancelling is excellent.", "Manual only in English, which was inconvenient.",
]
KST = datetime.timezone(datetime.timedelta(hours=9))
CENTS = decimal.Decimal("0.01")


def make_rows(n: int, seed: int = 42) -> list[dict]:
    """``n`` order/review rows as psycopg2's RealDictCursor would return them."""
    rnd = random.Random(seed)
    start = datetime.datetime(2024, 1, 1, tzinfo=KST)
    rows = []
    for i in range(n):
        review_pool = REVIEWS_KO if rnd.random() < 0.6 else REVIEWS_EN
        rows.append(
            {
                "order_id": 100000 + i,
                "customer": rnd.choice(SURNAMES) + rnd.choice(GIVEN),
                "product": rnd.choice(PRODUCTS),
                "price": (decimal.Decimal(rnd.randrange(990, 499000, 10)) / 100).quantize(CENTS),  # numeric(10,2)
                "ordered_at": start + datetime.timedelta(seconds=rnd.randrange(0, 365 * 86400)),
                "rating": rnd.randint(1, 5) if rnd.random() < 0.9 else None,
                "review": rnd.choice(review_pool) if rnd.random() < 0.8 else None,
            }
        )
    return rows


def _median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    sizes = (1_000, 10_000, 200_000)
    rows = make_rows(max(sizes))
    budget = prompt_builder.default_token_budget()
    real = token_count.Cl100kCounter()
    t0 = time.perf_counter()
    assert real.load(), real.failure
    print(f"prompt_builder benchmark — Python {sys.version.split()[0]}, default budget {budget:,} tokens")
    print(f"cl100k_base vocabulary loaded in {(time.perf_counter() - t0) * 1000:.0f} ms from {real.source}")
    print()
    print(f"{'rows':>9} {'format':>9} {'counter':>9} {'median ms':>10} {'rows shown':>11} {'counted':>8} "
          f"{'real tokens':>12} {'chars':>8}")
    budgeted = {}
    for fmt in prompt_builder.FORMATS:
        for n in sizes:
            data = {"query": "SELECT * FROM orders", "results": rows[:n], "row_count": n}
            for label, counter in (("cl100k", real), ("estimate", token_count.ESTIMATE)):
                result = prompt_builder.build_prompt(data, data_format=fmt, counter=counter)
                t = _median_time(lambda d=data, f=fmt, c=counter: prompt_builder.build_prompt(d, data_format=f, counter=c),
                                 runs=7)
                budgeted[fmt, n, label] = t
                print(
                    f"{n:>9,} {fmt:>9} {label:>9} {t * 1000:>10.2f} {result.rows_shown:>11,} "
                    f"{result.estimated_tokens:>8,} {real.count(result.text):>12,} {result.char_count:>8,}"
                )
    print()
    print("Unbudgeted format_db_results over 10,000 rows:")
    sample = rows[:10_000]
    for fmt in prompt_builder.FORMATS:
        t = _median_time(lambda f=fmt: prompt_builder.format_db_results(sample, f), runs=3)
        rate = len(sample) / t
        est_200k = max(sizes) / rate
        ratio = est_200k / budgeted[fmt, max(sizes), "cl100k"]
        print(
            f"  {fmt:>9}: {rate:>9,.0f} rows/s -> 200,000 rows would take ~{est_200k:.2f} s; "
            f"budgeted 200k build is {ratio:,.0f}x faster"
        )
    worst = max(budgeted[fmt, max(sizes), label] for fmt in prompt_builder.FORMATS for label in ("cl100k", "estimate"))
    print()
    print(f"Slowest budgeted 200,000-row build: {worst * 1000:.2f} ms (target < 300 ms): {'OK' if worst < 0.3 else 'TOO SLOW'}")
    print()
    chunk_table(rows[:20_000], real)


def chunk_table(rows: list[dict], real: token_count.Cl100kCounter, budget: int = 4000) -> None:
    """Every row into prompts of ``budget`` tokens, as map-reduce will: chunks against the ideal, fill."""
    print(f"row_packer: {len(rows):,} rows into {budget:,}-token prompts (default template, real counter)")
    print(f"{'format':>9} {'chunks':>7} {'ideal':>6} {'ratio':>6} {'min fill':>9} {'mean fill':>10} {'seconds':>8}")
    frame = row_packer.Frame(("Analyze the following database query results.\n\nData:\n",
                              "\n\nSummarize the key patterns, notable values and anything unusual."))
    for fmt in prompt_builder.FORMATS:
        layout = value_format.row_layout(fmt, list(rows[0]))
        t0 = time.perf_counter()
        chunks = list(row_packer.RowPacker(rows, layout, frame, max_tokens=budget, counter=real, max_cell_chars=500))
        seconds = time.perf_counter() - t0
        # Ideal: the rows' own tokens (one header per chunk aside) over what a prompt leaves for them.
        room = budget - real.count(frame.render(""))
        ideal = math.ceil(real.count(layout.block(rows)) / room)
        fills = [c.tokens / budget for c in chunks[:-1]]
        print(f"{fmt:>9} {len(chunks):>7,} {ideal:>6,} {len(chunks) / ideal:>6.2f} {min(fills):>9.1%} "
              f"{statistics.mean(fills):>10.1%} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
