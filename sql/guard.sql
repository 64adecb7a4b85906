--
-- guard: which addresses outbound HTTP may connect to, as address_allowed()
-- reports the worker's verdict.
--
-- The cluster runs with jobloop.allowed_hosts = '127.0.0.1' (scripts/lib.sh
-- sets it): loopback, private, link-local, reserved, multicast and
-- documentation addresses are refused unless listed there, in IPv4, IPv6 and
-- IPv4-embedding IPv6 forms alike; public addresses are allowed.
--
SHOW jobloop.allowed_hosts;

SELECT address, jobloop.address_allowed(address::inet) AS allowed
  FROM (VALUES
        -- public
        ('8.8.8.8'), ('1.1.1.1'), ('172.32.0.1'), ('100.128.0.1'), ('223.255.255.255'),
        ('2606:4700::1111'), ('2a00:1450:4001:80b::200e'), ('::ffff:8.8.8.8'),
        ('2002:808:808::1'),
        -- listed in jobloop.allowed_hosts
        ('127.0.0.1'), ('::ffff:127.0.0.1'),
        -- loopback, not listed
        ('127.0.0.2'), ('127.1.2.3'), ('127.255.255.255'), ('::1'),
        -- unspecified
        ('0.0.0.0'), ('0.1.2.3'), ('::'),
        -- private (RFC 1918, RFC 4193)
        ('10.0.0.1'), ('10.255.255.255'), ('172.16.0.1'), ('172.31.255.255'),
        ('192.168.0.1'), ('192.168.255.255'), ('fc00::1'), ('fd12:3456:789a::1'),
        -- link-local, cloud metadata
        ('169.254.169.254'), ('169.254.0.1'), ('fe80::1'), ('febf::1'), ('fd00:ec2::254'),
        -- shared address space (carrier-grade NAT)
        ('100.64.0.1'), ('100.127.255.255'),
        -- IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms of non-public IPv4
        ('::ffff:10.0.0.1'), ('::ffff:169.254.169.254'), ('::ffff:127.0.0.2'), ('::ffff:0.0.0.0'),
        ('::10.0.0.1'), ('64:ff9b::a00:1'), ('64:ff9b::a9fe:a9fe'), ('2002:a00:1::1'),
        ('2002:7f00:2::1'),
        -- reserved, benchmarking, documentation, multicast, broadcast, site-local
        ('192.0.0.1'), ('198.18.0.1'), ('198.19.255.255'), ('192.0.2.1'), ('198.51.100.1'),
        ('203.0.113.1'), ('224.0.0.1'), ('239.255.255.255'), ('240.0.0.1'),
        ('255.255.255.255'), ('2001:db8::1'), ('ff02::1'), ('fec0::1'), ('100::1')
       ) AS v(address);

-- The host name a URL used only matters when it is listed.
SELECT jobloop.address_allowed('10.1.2.3', 'internal.example.com');
SELECT jobloop.address_allowed('127.0.0.1', 'example.com');
SELECT jobloop.address_allowed('8.8.8.8', 'dns.google');
SELECT jobloop.address_allowed('8.8.8.8', NULL);
SELECT jobloop.address_allowed(NULL);
SELECT jobloop.address_allowed(NULL, 'localhost');

-- A network in CIDR form is judged by its address.
SELECT jobloop.address_allowed('10.0.0.0/8');
SELECT jobloop.address_allowed('8.8.8.0/24');

-- Only the server configuration changes the allow list: not SET, not a
-- function's SET clause.
SET jobloop.allowed_hosts = '*';
BEGIN;
SET LOCAL jobloop.allowed_hosts = '*';
ROLLBACK;
SELECT set_config('jobloop.allowed_hosts', '*', false);
CREATE FUNCTION guard_allow_all() RETURNS boolean LANGUAGE sql
    SET jobloop.allowed_hosts = '*' AS $$ SELECT jobloop.address_allowed('10.0.0.1') $$;
SHOW jobloop.allowed_hosts;
SELECT jobloop.address_allowed('10.0.0.1');

-- Nor can a role that is not a superuser.
CREATE ROLE regress_jobloop_guard;
GRANT USAGE ON SCHEMA jobloop TO regress_jobloop_guard;
SET ROLE regress_jobloop_guard;
SET jobloop.allowed_hosts = '*';
ALTER SYSTEM SET jobloop.allowed_hosts = '*';
SELECT jobloop.address_allowed('127.0.0.1'), jobloop.address_allowed('127.0.0.2');
RESET ROLE;
REVOKE USAGE ON SCHEMA jobloop FROM regress_jobloop_guard;
DROP ROLE regress_jobloop_guard;

-- The jobloop.* prefix is reserved for the extension's own settings.
SET jobloop.no_such_setting = 'x';
