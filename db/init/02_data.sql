-- Sample data: a small Korean online shop. Deterministic (no random()), so the
-- README's example outputs and the tests stay stable.

INSERT INTO customers (id, name, email, city, country, joined_at, is_vip, notes) VALUES
 (1,  '김민준', 'minjun.kim@example.com',   '서울', 'KR', '2023-01-15 10:20:00+09', true,  '주말에만 배송 요청'),
 (2,  '이서연', 'seoyeon.lee@example.com',  '부산', 'KR', '2023-02-03 14:05:00+09', false, NULL),
 (3,  '박지호', NULL,                        '대구', 'KR', '2023-03-22 09:00:00+09', false, NULL),
 (4,  '최수아', 'sua.choi@example.com',     '서울', 'KR', '2023-04-10 19:45:00+09', true,  ''),
 (5,  '정예준', 'yejun.jung@example.com',   '인천', 'KR', '2023-05-01 08:30:00+09', false, NULL),
 (6,  'Emily Carter', 'emily.carter@example.com', 'Seoul', 'US', '2023-06-12 11:11:00+09', false, 'Prefers English support'),
 (7,  '강하은', 'haeun.kang@example.com',   '광주', 'KR', '2023-07-07 07:07:00+09', false, NULL),
 (8,  '윤도윤', 'doyun.yoon@example.com',   '대전', 'KR', '2023-08-19 16:40:00+09', true,  NULL),
 (9,  '장서윤', NULL,                        '서울', 'KR', '2023-09-30 21:15:00+09', false, '선물 포장 😀'),
 (10, 'Lucas Martin', 'lucas.martin@example.com', 'Busan', 'FR', '2023-10-05 13:00:00+09', false, NULL),
 (11, '임지우', 'jiwoo.lim@example.com',    '수원', 'KR', '2023-11-11 11:11:00+09', false, NULL),
 (12, '한시우', 'siwoo.han@example.com',    '서울', 'KR', '2023-12-24 18:00:00+09', true,  NULL);

INSERT INTO products (id, sku, name, category, price, tags, attributes, discontinued_on) VALUES
 (1,  '8f14e45f-ceea-467f-a0e6-000000000001', '무선 이어폰 Pro',       '전자기기', 129000.00, '{audio,bluetooth}',   '{"color": "white", "battery_hours": 24}', NULL),
 (2,  '8f14e45f-ceea-467f-a0e6-000000000002', '기계식 키보드',          '전자기기',  89000.00, '{keyboard,rgb}',      '{"switch": "brown", "layout": "ko"}',     NULL),
 (3,  '8f14e45f-ceea-467f-a0e6-000000000003', '유기농 녹차 50티백',     '식품',      12500.00, '{tea,organic}',       '{"origin": "보성"}',                        NULL),
 (4,  '8f14e45f-ceea-467f-a0e6-000000000004', '스테인리스 텀블러',      '주방',      23900.00, '{}',                  NULL,                                       NULL),
 (5,  '8f14e45f-ceea-467f-a0e6-000000000005', 'Ergonomic Office Chair', '가구',     249000.00, '{office,ergonomic}',  '{"max_load_kg": 120, "parts": ["seat", "arm"]}', NULL),
 (6,  '8f14e45f-ceea-467f-a0e6-000000000006', '보조배터리 20000mAh',    '전자기기',  35000.00, '{battery}',           '{"capacity_mah": 20000}',                 '2024-06-30'),
 (7,  '8f14e45f-ceea-467f-a0e6-000000000007', '핸드드립 커피 원두 1kg', '식품',      32000.00, '{coffee}',            '{"roast": "medium", "notes": ["초콜릿", "견과"]}', NULL),
 (8,  '8f14e45f-ceea-467f-a0e6-000000000008', 'LED 스탠드',             '가구',      45900.00, '{lamp,"eye care"}',   '{"color_temp_k": [3000, 6500]}',          NULL),
 (9,  '8f14e45f-ceea-467f-a0e6-000000000009', '요가 매트 | 6mm',        '스포츠',    27000.00, '{yoga}',              '{}',                                       NULL),
 (10, '8f14e45f-ceea-467f-a0e6-00000000000a', 'USB-C 케이블 (2m)',      '전자기기',   9900.00, '{cable,usb-c}',       NULL,                                       NULL);

-- 120 orders spread over 2024, deterministic customer/status/amount patterns.
INSERT INTO orders (id, customer_id, ordered_at, status, delivery_time, total)
SELECT g,
       1 + (g * 7) % 12,
       timestamptz '2024-01-01 09:00:00+09' + (g * interval '2 days 3 hours 17 minutes'),
       (ARRAY['paid', 'shipped', 'delivered', 'delivered', 'delivered', 'cancelled', 'delivered', 'refunded'])[1 + g % 8],
       CASE WHEN (ARRAY['paid', 'shipped', 'delivered', 'delivered', 'delivered', 'cancelled', 'delivered', 'refunded'])[1 + g % 8] = 'delivered'
            THEN make_interval(days => 1 + g % 4, hours => g % 24) END,
       0
FROM generate_series(1, 120) AS g;

INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, 1 + (o.id + p.id) % 3, p.price
FROM orders o
JOIN products p ON p.id IN (1 + o.id % 10, 1 + (o.id * 3 + 1) % 10);

UPDATE orders o SET total = s.total
FROM (SELECT order_id, sum(quantity * unit_price) AS total FROM order_items GROUP BY order_id) s
WHERE s.order_id = o.id;

INSERT INTO reviews (id, product_id, customer_id, rating, title, body, language, created_at, helpful_votes) VALUES
 (1,  1, 1,  5, '음질 최고',        '노이즈 캔슬링이 정말 좋아요. 지하철에서도 조용합니다.', 'ko', '2024-02-01 12:00:00+09', 14),
 (2,  1, 6,  4, 'Great sound',      'Sound is great, but the case scratches easily.',         'en', '2024-02-10 09:30:00+09', 5),
 (3,  1, 9,  2, '연결 끊김',        '블루투스 연결이 자주 끊겨요. 펌웨어 업데이트 후에도 같아요.', 'ko', '2024-03-05 22:10:00+09', 21),
 (4,  2, 2,  5, '타건감 좋음',      '갈축이라 조용하고 손목이 편합니다.',                     'ko', '2024-02-14 18:20:00+09', 3),
 (5,  2, 10, 3, NULL,               'Good keyboard. Korean keycaps would be nice on the box photo.', 'en', '2024-03-01 10:00:00+09', 0),
 (6,  3, 3,  5, '향이 좋아요',      '보성 녹차 특유의 향이 진합니다. 재구매 의사 있어요.',     'ko', '2024-01-20 08:00:00+09', 7),
 (7,  3, 7,  4, '',                 '가격 대비 괜찮아요.',                                      'ko', '2024-04-02 15:45:00+09', 1),
 (8,  4, 4,  1, '뚜껑 불량',        '뚜껑이 헐거워서 가방에서 샜습니다. 교환 요청합니다.',     'ko', '2024-03-18 07:50:00+09', 30),
 (9,  4, 11, 4, '보온 잘 됨',       '아침에 넣은 커피가 오후까지 따뜻해요.',                   'ko', '2024-05-09 13:13:00+09', 2),
 (10, 5, 6,  5, 'Back pain gone',   'After two weeks my back pain is gone. Assembly took 40 minutes.', 'en', '2024-04-22 20:00:00+09', 18),
 (11, 5, 12, 3, '배송 지연',        '의자는 좋은데 배송이 일주일 늦었어요.',                   'ko', '2024-05-30 11:00:00+09', 9),
 (12, 6, 5,  2, '발열',             '충전할 때 너무 뜨거워져서 불안합니다.',                    'ko', '2024-06-01 19:00:00+09', 25),
 (13, 7, 8,  5, '인생 원두',        '초콜릿 향이 진하고 산미가 적어요 ☕',                     'ko', '2024-06-15 07:30:00+09', 11),
 (14, 7, 1,  4, '맛있어요',         '핸드드립용으로 적당한 분쇄도입니다.',                     'ko', '2024-07-04 09:00:00+09', 0),
 (15, 8, 9,  3, '밝기 부족',        '책 읽기에는 조금 어두워요.',                              'ko', '2024-07-20 23:00:00+09', 4),
 (16, 9, 2,  5, '미끄럼 없음',      '두께감이 좋아서 무릎이 안 아파요.',                       'ko', '2024-08-08 06:30:00+09', 6),
 (17, 10, 10, 1, 'Broke in a week', 'The connector stopped working after a week. Returned it.', 'en', '2024-08-21 17:00:00+09', 8),
 (18, 10, 4, 4, '튼튼해요',         '길이가 넉넉해서 침대에서 쓰기 좋아요.',                   'ko', '2024-09-02 22:22:00+09', 2),
 (19, 2, 8,  2, '키 씹힘',          '스페이스바가 가끔 안 눌립니다. "A/S" 문의 중.',           'ko', '2024-09-15 10:10:00+09', 12),
 (20, 6, 11, 5, '용량 충분',        '여행 갈 때 폰 세 번 충전했어요.
배송도 빨랐습니다.',                                                                             'ko', '2024-10-01 12:00:00+09', 3);
