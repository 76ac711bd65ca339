PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES(1);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    duration_s REAL NOT NULL DEFAULT 0,
    config TEXT NOT NULL DEFAULT '{}',
    speakers TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    audio_path TEXT,
    error TEXT
);
INSERT INTO jobs VALUES('job_v1_completed','key_7d79e4ce5cd3c289','completed','sip',1790000000.0,1790000012.4999999999,12.5,'{"language": "en"}','["caller", "agent"]','{"fixture": "completed"}','/data/rec/c.wav',NULL);
INSERT INTO jobs VALUES('job_v1_failed','key_5a5094e65b6557e8','failed','stream',1790000020.0,1790000023.0,3.0,'{}','[]','{}',NULL,'{"code": "INTERNAL", "message": "boom"}');
INSERT INTO jobs VALUES('job_v1_live','key_7d79e4ce5cd3c289','live','stream',1790000030.0,NULL,0.0,'{}','[]','{}',NULL,NULL);
CREATE TABLE segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    start REAL NOT NULL,
    "end" REAL NOT NULL,
    text TEXT NOT NULL,
    words TEXT NOT NULL DEFAULT '[]',
    speech_final INTEGER NOT NULL,
    language TEXT,
    confidence REAL,
    original_text TEXT,
    original_speaker TEXT,
    edited_at REAL,
    UNIQUE (job_id, seq)
);
INSERT INTO segments VALUES(1,'job_v1_completed',0,0,'caller',0.0,1.0,'hello there','[{"word": "hello", "start": 0.0, "end": 0.4, "confidence": 0.9}, {"word": "there", "start": 0.0, "end": 0.4, "confidence": 0.9}]',1,'en',0.9000000000000000222,NULL,NULL,NULL);
INSERT INTO segments VALUES(2,'job_v1_completed',1,1,'agent',1.5,2.5,'good morning','[{"word": "good", "start": 1.5, "end": 1.9, "confidence": 0.9}, {"word": "mornin", "start": 1.5, "end": 1.9, "confidence": 0.9}]',1,'en',0.9000000000000000222,'good mornin','agent',1795882721.5527777671);
INSERT INTO segments VALUES(3,'job_v1_failed',0,0,'caller',0.0,1.0,'cut off','[{"word": "cut", "start": 0.0, "end": 0.4, "confidence": 0.9}, {"word": "off", "start": 0.0, "end": 0.4, "confidence": 0.9}]',1,'en',0.9000000000000000222,NULL,NULL,NULL);
INSERT INTO segments VALUES(4,'job_v1_live',0,0,'caller',0.0,1.0,'still talking','[{"word": "still", "start": 0.0, "end": 0.4, "confidence": 0.9}, {"word": "talking", "start": 0.0, "end": 0.4, "confidence": 0.9}]',1,'en',0.9000000000000000222,NULL,NULL,NULL);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    balance INTEGER
);
INSERT INTO api_keys VALUES('key_5a5094e65b6557e8','5a5094e65b6557e893f843a5828df7706977cdc46601f63b60e2ae2ae76d817d','cb-fixtu','config',1795882721.5467028618,NULL,NULL);
INSERT INTO api_keys VALUES('key_7d79e4ce5cd3c289','7d79e4ce5cd3c2891ed25a2397ad0af21d5ef324b66fd2575f9893cb5fb3ccd5','cbk_umIp','metered',1795882721.5482194424,NULL,1000);
INSERT INTO api_keys VALUES('key_83c8156ccf5f6669','83c8156ccf5f666960dbed4372d8836ff812cb0b99183c5c49e0fbc88a2df607','cbk_eqRb','revoked',1795882721.5498819351,1795882721.5501828193,NULL);
CREATE TABLE temp_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
INSERT INTO temp_tokens VALUES('7d47ff152115d77f1024ed6faff1688cd14a82a2e458f93c61239200b552fe9c','key_5a5094e65b6557e8',1795882721.5504775047,1795886321.5504775046,NULL);
CREATE TABLE credit_reservations (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    credits INTEGER NOT NULL,
    created_at REAL NOT NULL
);
INSERT INTO credit_reservations VALUES('job_v1_live','key_7d79e4ce5cd3c289',60,1795882721.5550229549);
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT NOT NULL,
    sources TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    enabled INTEGER NOT NULL DEFAULT 1,
    managed_by TEXT NOT NULL DEFAULT 'api',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
INSERT INTO webhook_endpoints VALUES('wh_v1','key_7d79e4ce5cd3c289','https://hooks.example/cb','whsec_fixture','["call_started", "call_ended"]','[]','',1,'api',1790000000.0,1790000000.0);
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    job_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_attempt_at REAL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL
);
INSERT INTO webhook_deliveries VALUES(1,'wh_v1','job_v1_completed','evt_0',0,'call_started','{"fixture": 0}','delivered',1,1790000000.0,1790000001.0,1790000001.0,200,NULL,1790000001.0);
INSERT INTO webhook_deliveries VALUES(2,'wh_v1','job_v1_completed','evt_1',1,'call_ended','{"fixture": 1}','pending',1,1790000001.0,1790000060.0,1790000002.0,503,'HTTP 503',NULL);
INSERT INTO webhook_deliveries VALUES(3,'wh_v1','job_v1_failed','evt_9',0,'call_started','{"fixture": 9}','dead',1,1790000009.0,1790000099.0,1790000010.0,500,'HTTP 500',NULL);
DELETE FROM sqlite_sequence;
INSERT INTO sqlite_sequence VALUES('segments',4);
INSERT INTO sqlite_sequence VALUES('webhook_deliveries',3);
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_owner_created ON jobs (owner, created_at DESC, id DESC);
CREATE INDEX jobs_status ON jobs (status);
CREATE INDEX segments_job_order ON segments (job_id, start, channel, seq);
CREATE INDEX temp_tokens_expires ON temp_tokens (expires_at);
CREATE INDEX credit_reservations_owner ON credit_reservations (owner);
CREATE INDEX webhook_endpoints_owner ON webhook_endpoints (owner, created_at);
CREATE INDEX webhook_deliveries_chain ON webhook_deliveries (status, endpoint_id, job_id, id);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, endpoint_id, id);
COMMIT;
