--
-- PostgreSQL database dump
--

\restrict hqRCBvy64iAQOTBBT67DiWEEKWdXiNSaNLYcQgflmsMBRUhiK2OB49vYSq8GoBy

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: api_keys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.api_keys (
    id text NOT NULL COLLATE pg_catalog."C",
    key_hash text NOT NULL,
    prefix text NOT NULL,
    name text,
    created_at double precision NOT NULL,
    revoked_at double precision,
    balance bigint
);


--
-- Name: credit_reservations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.credit_reservations (
    job_id text NOT NULL COLLATE pg_catalog."C",
    owner text NOT NULL COLLATE pg_catalog."C",
    credits bigint NOT NULL,
    created_at double precision NOT NULL
);


--
-- Name: jobs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.jobs (
    id text NOT NULL COLLATE pg_catalog."C",
    owner text NOT NULL COLLATE pg_catalog."C",
    status text NOT NULL,
    source text NOT NULL,
    created_at double precision NOT NULL,
    ended_at double precision,
    duration_s double precision DEFAULT 0 NOT NULL,
    config text DEFAULT '{}'::text NOT NULL,
    speakers text DEFAULT '[]'::text NOT NULL,
    metadata text DEFAULT '{}'::text NOT NULL,
    audio_path text,
    error text
);


--
-- Name: schema_version; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_version (
    version integer NOT NULL
);


--
-- Name: segments; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.segments (
    id bigint NOT NULL,
    job_id text NOT NULL COLLATE pg_catalog."C",
    seq integer NOT NULL,
    channel integer NOT NULL,
    speaker text NOT NULL,
    start double precision NOT NULL,
    "end" double precision NOT NULL,
    text text NOT NULL,
    words text DEFAULT '[]'::text NOT NULL,
    speech_final boolean NOT NULL,
    language text,
    confidence double precision,
    original_text text,
    original_speaker text,
    edited_at double precision
);


--
-- Name: segments_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

ALTER TABLE public.segments ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.segments_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: temp_tokens; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.temp_tokens (
    token_hash text NOT NULL,
    key_id text NOT NULL COLLATE pg_catalog."C",
    created_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    used_at double precision
);


--
-- Name: webhook_deliveries; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.webhook_deliveries (
    id bigint NOT NULL,
    endpoint_id text NOT NULL COLLATE pg_catalog."C",
    job_id text NOT NULL COLLATE pg_catalog."C",
    event_id text NOT NULL,
    seq integer NOT NULL,
    type text NOT NULL,
    body text NOT NULL,
    status text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    created_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL,
    last_attempt_at double precision,
    last_status integer,
    last_error text,
    delivered_at double precision
);


--
-- Name: webhook_deliveries_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

ALTER TABLE public.webhook_deliveries ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.webhook_deliveries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: webhook_endpoints; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.webhook_endpoints (
    id text NOT NULL COLLATE pg_catalog."C",
    owner text NOT NULL COLLATE pg_catalog."C",
    url text NOT NULL,
    secret text NOT NULL,
    events text NOT NULL,
    sources text DEFAULT '[]'::text NOT NULL,
    description text DEFAULT ''::text NOT NULL,
    enabled boolean DEFAULT true NOT NULL,
    managed_by text DEFAULT 'api'::text NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);


--
-- Data for Name: api_keys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.api_keys VALUES ('key_5a5094e65b6557e8', '5a5094e65b6557e893f843a5828df7706977cdc46601f63b60e2ae2ae76d817d', 'cb-fixtu', 'config', 1795882727.1224415, NULL, NULL);
INSERT INTO public.api_keys VALUES ('key_3265da24e9cd29f6', '3265da24e9cd29f647f330020919ab9ecb0e162e4743f7c208d5411f5fe574a0', 'cbk_b7CG', 'metered', 1795882727.1280568, NULL, 1000);
INSERT INTO public.api_keys VALUES ('key_6b149bc8d9ca4bbc', '6b149bc8d9ca4bbc655dd81978f61aadacef803bf6030404e2c91fda1119f77f', 'cbk_omvF', 'revoked', 1795882727.1292548, 1795882727.130362, NULL);


--
-- Data for Name: credit_reservations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.credit_reservations VALUES ('job_v1_live', 'key_3265da24e9cd29f6', 60, 1795882727.1468363);


--
-- Data for Name: jobs; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.jobs VALUES ('job_v1_completed', 'key_3265da24e9cd29f6', 'completed', 'sip', 1790000000, 1790000012.5, 12.5, '{"language": "en"}', '["caller", "agent"]', '{"fixture": "completed"}', '/data/rec/c.wav', NULL);
INSERT INTO public.jobs VALUES ('job_v1_failed', 'key_5a5094e65b6557e8', 'failed', 'stream', 1790000020, 1790000023, 3, '{}', '[]', '{}', NULL, '{"code": "INTERNAL", "message": "boom"}');
INSERT INTO public.jobs VALUES ('job_v1_live', 'key_3265da24e9cd29f6', 'live', 'stream', 1790000030, NULL, 0, '{}', '[]', '{}', NULL, NULL);


--
-- Data for Name: schema_version; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.schema_version VALUES (1);


--
-- Data for Name: segments; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.segments OVERRIDING SYSTEM VALUE VALUES (1, 'job_v1_completed', 0, 0, 'caller', 0, 1, 'hello there', '[{"word": "hello", "start": 0.0, "end": 0.4, "confidence": 0.9}, {"word": "there", "start": 0.0, "end": 0.4, "confidence": 0.9}]', true, 'en', 0.9, NULL, NULL, NULL);
INSERT INTO public.segments OVERRIDING SYSTEM VALUE VALUES (2, 'job_v1_completed', 1, 1, 'agent', 1.5, 2.5, 'good morning', '[{"word": "good", "start": 1.5, "end": 1.9, "confidence": 0.9}, {"word": "mornin", "start": 1.5, "end": 1.9, "confidence": 0.9}]', true, 'en', 0.9, 'good mornin', 'agent', 1795882727.139879);
INSERT INTO public.segments OVERRIDING SYSTEM VALUE VALUES (3, 'job_v1_failed', 0, 0, 'caller', 0, 1, 'cut off', '[{"word": "cut", "start": 0.0, "end": 0.4, "confidence": 0.9}, {"word": "off", "start": 0.0, "end": 0.4, "confidence": 0.9}]', true, 'en', 0.9, NULL, NULL, NULL);
INSERT INTO public.segments OVERRIDING SYSTEM VALUE VALUES (4, 'job_v1_live', 0, 0, 'caller', 0, 1, 'still talking', '[{"word": "still", "start": 0.0, "end": 0.4, "confidence": 0.9}, {"word": "talking", "start": 0.0, "end": 0.4, "confidence": 0.9}]', true, 'en', 0.9, NULL, NULL, NULL);


--
-- Data for Name: temp_tokens; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.temp_tokens VALUES ('2d67b4d77656d6bec18204a1ec733c88614c75cc763f742e0b5b85039070de17', 'key_5a5094e65b6557e8', 1795882727.1311374, 1795886327.1311374, NULL);


--
-- Data for Name: webhook_deliveries; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.webhook_deliveries OVERRIDING SYSTEM VALUE VALUES (1, 'wh_v1', 'job_v1_completed', 'evt_0', 0, 'call_started', '{"fixture": 0}', 'delivered', 1, 1790000000, 1790000001, 1790000001, 200, NULL, 1790000001);
INSERT INTO public.webhook_deliveries OVERRIDING SYSTEM VALUE VALUES (2, 'wh_v1', 'job_v1_completed', 'evt_1', 1, 'call_ended', '{"fixture": 1}', 'pending', 1, 1790000001, 1790000060, 1790000002, 503, 'HTTP 503', NULL);
INSERT INTO public.webhook_deliveries OVERRIDING SYSTEM VALUE VALUES (3, 'wh_v1', 'job_v1_failed', 'evt_9', 0, 'call_started', '{"fixture": 9}', 'dead', 1, 1790000009, 1790000099, 1790000010, 500, 'HTTP 500', NULL);


--
-- Data for Name: webhook_endpoints; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.webhook_endpoints VALUES ('wh_v1', 'key_3265da24e9cd29f6', 'https://hooks.example/cb', 'whsec_fixture', '["call_started", "call_ended"]', '[]', '', true, 'api', 1790000000, 1790000000);


--
-- Name: segments_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.segments_id_seq', 4, true);


--
-- Name: webhook_deliveries_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.webhook_deliveries_id_seq', 3, true);


--
-- Name: api_keys api_keys_key_hash_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash);


--
-- Name: api_keys api_keys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (id);


--
-- Name: credit_reservations credit_reservations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.credit_reservations
    ADD CONSTRAINT credit_reservations_pkey PRIMARY KEY (job_id);


--
-- Name: jobs jobs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.jobs
    ADD CONSTRAINT jobs_pkey PRIMARY KEY (id);


--
-- Name: segments segments_job_id_seq_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.segments
    ADD CONSTRAINT segments_job_id_seq_key UNIQUE (job_id, seq);


--
-- Name: segments segments_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.segments
    ADD CONSTRAINT segments_pkey PRIMARY KEY (id);


--
-- Name: temp_tokens temp_tokens_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.temp_tokens
    ADD CONSTRAINT temp_tokens_pkey PRIMARY KEY (token_hash);


--
-- Name: webhook_deliveries webhook_deliveries_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (id);


--
-- Name: webhook_endpoints webhook_endpoints_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.webhook_endpoints
    ADD CONSTRAINT webhook_endpoints_pkey PRIMARY KEY (id);


--
-- Name: credit_reservations_owner; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX credit_reservations_owner ON public.credit_reservations USING btree (owner);


--
-- Name: jobs_created; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX jobs_created ON public.jobs USING btree (created_at DESC, id DESC);


--
-- Name: jobs_owner_created; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX jobs_owner_created ON public.jobs USING btree (owner, created_at DESC, id DESC);


--
-- Name: jobs_status; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX jobs_status ON public.jobs USING btree (status);


--
-- Name: segments_job_order; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX segments_job_order ON public.segments USING btree (job_id, start, channel, seq);


--
-- Name: temp_tokens_expires; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX temp_tokens_expires ON public.temp_tokens USING btree (expires_at);


--
-- Name: webhook_deliveries_chain; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX webhook_deliveries_chain ON public.webhook_deliveries USING btree (status, endpoint_id, job_id, id);


--
-- Name: webhook_deliveries_endpoint; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX webhook_deliveries_endpoint ON public.webhook_deliveries USING btree (endpoint_id, id);


--
-- Name: webhook_deliveries_job; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX webhook_deliveries_job ON public.webhook_deliveries USING btree (job_id, endpoint_id, id);


--
-- Name: webhook_endpoints_owner; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX webhook_endpoints_owner ON public.webhook_endpoints USING btree (owner, created_at);


--
-- Name: segments segments_job_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.segments
    ADD CONSTRAINT segments_job_id_fkey FOREIGN KEY (job_id) REFERENCES public.jobs(id) ON DELETE CASCADE;


--
-- Name: webhook_deliveries webhook_deliveries_endpoint_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_endpoint_id_fkey FOREIGN KEY (endpoint_id) REFERENCES public.webhook_endpoints(id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--

\unrestrict hqRCBvy64iAQOTBBT67DiWEEKWdXiNSaNLYcQgflmsMBRUhiK2OB49vYSq8GoBy

