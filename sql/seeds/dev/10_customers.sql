-- Fake customers for local development (fictional people, example.com addresses).
COPY customers (email, full_name, phone, created_at) FROM stdin;
alice@example.com	Alice Martin	+33 6 12 34 56 78	2025-11-02 09:15:00+00
bob@example.com	Bob Lefèvre	\N	2025-11-14 17:40:00+00
zoe@example.com	Zoë Durand	+33 7 98 76 54 32	2025-12-01 08:05:00+00
chen@example.com	Chen Wei	+86 10 1234 5678	2025-12-20 22:30:00+00
\.
