--
-- PostgreSQL database cluster dump
--

\restrict NU9o8OI7HvQn33QT

SET default_transaction_read_only = off;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

CREATE ROLE "Mixed ""Case""";
ALTER ROLE "Mixed ""Case""" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS PASSWORD 'SCRAM-SHA-256$4096:f/TQ==$6o0=:Zm/W=';
CREATE ROLE grp;
ALTER ROLE grp WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 5 VALID UNTIL '2030-01-01 00:00:00+00';
COMMENT ON ROLE grp IS 'multi
line; it''s -- not a comment';
ALTER ROLE grp SET search_path TO 'a', 'b';
ALTER ROLE "Mixed ""Case""" IN DATABASE app SET "custom.flag" TO 'on';
SECURITY LABEL FOR dummy ON ROLE grp IS 'classified';
GRANT SET ON PARAMETER log_statement TO grp;
GRANT grp TO "Mixed ""Case""" GRANTED BY postgres;
GRANT grp TO "Mixed ""Case""" WITH INHERIT TRUE, SET FALSE GRANTED BY postgres;

\unrestrict NU9o8OI7HvQn33QT
