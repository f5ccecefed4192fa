-- Sample shop schema for db_to_model_pipeline.
-- Loaded by the postgres image on first start (docker-entrypoint-initdb.d) and by the test suite.
-- Plain SQL only (no psql meta-commands), so both can run it.

CREATE TABLE customers (
    id          integer PRIMARY KEY,
    name        text        NOT NULL,
    email       text,                       -- NULL for a few guests
    city        text        NOT NULL,
    country     text        NOT NULL DEFAULT 'KR',
    joined_at   timestamptz NOT NULL,
    is_vip      boolean     NOT NULL DEFAULT false,
    notes       text                        -- mostly NULL, one empty string
);

CREATE TABLE products (
    id          integer PRIMARY KEY,
    sku         uuid          NOT NULL UNIQUE,
    name        text          NOT NULL,
    category    text          NOT NULL,
    price       numeric(10,2) NOT NULL,
    tags        text[]        NOT NULL DEFAULT '{}',
    attributes  jsonb,
    discontinued_on date
);

CREATE TABLE orders (
    id           integer PRIMARY KEY,
    customer_id  integer       NOT NULL REFERENCES customers(id),
    ordered_at   timestamptz   NOT NULL,
    status       text          NOT NULL CHECK (status IN ('paid', 'shipped', 'delivered', 'cancelled', 'refunded')),
    delivery_time interval,                  -- NULL until delivered
    total        numeric(12,2) NOT NULL
);

CREATE TABLE order_items (
    order_id    integer       NOT NULL REFERENCES orders(id),
    product_id  integer       NOT NULL REFERENCES products(id),
    quantity    integer       NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

CREATE TABLE reviews (
    id           integer PRIMARY KEY,
    product_id   integer     NOT NULL REFERENCES products(id),
    customer_id  integer     NOT NULL REFERENCES customers(id),
    rating       smallint    NOT NULL CHECK (rating BETWEEN 1 AND 5),
    title        text,
    body         text        NOT NULL,
    language     text        NOT NULL,
    created_at   timestamptz NOT NULL,
    helpful_votes integer    NOT NULL DEFAULT 0
);

CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX reviews_product_idx ON reviews (product_id);

-- A view the README's examples use: one row per product with its review summary.
CREATE VIEW product_review_summary AS
SELECT p.id, p.name, p.category, p.price,
       count(r.id)                AS review_count,
       round(avg(r.rating), 2)    AS avg_rating,
       min(r.created_at)::date    AS first_review
FROM products p
LEFT JOIN reviews r ON r.product_id = p.id
GROUP BY p.id, p.name, p.category, p.price;
