-- Reviews with 3 stars or fewer, newest first, with the product they are about.
-- Run: python db_to_model_pipeline.py --query-file examples/low_rated_reviews.sql --param max_rating=3
SELECT r.created_at::date AS day, p.name AS product, r.rating, r.title, r.body, r.helpful_votes
FROM reviews r
JOIN products p ON p.id = r.product_id
WHERE r.rating <= %(max_rating)s::int
ORDER BY r.created_at DESC;
