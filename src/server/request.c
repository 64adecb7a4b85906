/*-------------------------------------------------------------------------
 *
 * request.c
 *		The request JSON a request function returns, and the response JSON
 *		a step function receives.
 *
 * request_parse validates strictly (an unknown key is an error, so a typo
 * fails the job loudly instead of being ignored) and copies what the HTTP
 * layer needs into a plain struct, so that nothing after the commit can
 * raise an error.  response_build turns a finished transfer into
 *   {"status": 200, "headers": {...}, "body": <JSON or text>, "elapsed_ms": n}
 *
 *-------------------------------------------------------------------------
 */
#include "jobloop.h"

#include <ctype.h>
#include <math.h>

#include <curl/curl.h>
#include <time.h>

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/numeric.h"

#include "headers.h"

#define MAX_URL_LEN		8192
#define MAX_HEADERS		100

static void
invalid_request(const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid request: %s", detail),
			 errhint("A request is a JSON object: {\"url\": ..., \"method\": ..., \"headers\": {...}, "
					 "\"body\": ..., \"timeout_ms\": n, \"delay_ms\": n, \"rate_key\": ...}.")));
}

static char *
string_value(JsonbValue *v, const char *key)
{
	if (v->type != jbvString)
		invalid_request(psprintf("\"%s\" must be a string", key));
	return pnstrdup(v->val.string.val, v->val.string.len);
}

static int
int_value(JsonbValue *v, const char *key, int min)
{
	double		d;

	if (v->type != jbvNumeric)
		invalid_request(psprintf("\"%s\" must be a number", key));
	d = DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow,
										   NumericGetDatum(v->val.numeric)));
	if (isnan(d) || d < min || d > INT_MAX)
		invalid_request(psprintf("\"%s\" must be between %d and %d", key, min, INT_MAX));
	return (int) d;
}

static bool
has_control_chars(const char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s < 0x20 || *s == 0x7f)
			return true;
	return false;
}

static void
check_url(const char *url)
{
	if (strlen(url) > MAX_URL_LEN)
		invalid_request("\"url\" is too long");
	if (pg_strncasecmp(url, "http://", 7) != 0 && pg_strncasecmp(url, "https://", 8) != 0)
		invalid_request(psprintf("unsupported URL \"%s\": only http and https are allowed", url));
	if (has_control_chars(url) || strchr(url, ' '))
		invalid_request("\"url\" contains spaces or control characters");
}

/* What limits apply to: the rate_key, or the URL's host:port. */
static char *
endpoint_of(HttpRequest *req)
{
	char	   *host;
	char	   *port;
	char	   *endpoint = NULL;

	if (req->rate_key)
	{
		if (req->rate_key[0] == '\0' || strlen(req->rate_key) >= ENDPOINT_LEN)
			invalid_request(psprintf("\"rate_key\" must be 1 to %d bytes long", ENDPOINT_LEN - 1));
		return pstrdup(req->rate_key);
	}
	if (url_origin(req->url, NULL, &host, &port))
	{
		for (char *c = host; *c; c++)
			*c = pg_tolower((unsigned char) *c);
		endpoint = psprintf("%s:%s", host, port);
	}
	if (endpoint == NULL)
		invalid_request(psprintf("malformed URL \"%s\"", req->url));
	if (strlen(endpoint) >= ENDPOINT_LEN)
		invalid_request("the URL's host name is too long");
	return endpoint;
}

static char *
check_method(char *method)
{
	static const char *const methods[] = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"};

	for (char *p = method; *p; p++)
		*p = pg_toupper((unsigned char) *p);
	for (int i = 0; i < lengthof(methods); i++)
		if (strcmp(method, methods[i]) == 0)
			return method;
	invalid_request(psprintf("unsupported method \"%s\"", method));
	return NULL;				/* keep compiler quiet */
}

static bool
is_token_char(unsigned char c)
{
	return isalnum(c) || strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static void
add_header(HttpRequest *req, const char *name, int namelen, JsonbValue *v)
{
	char	   *value;
	char	   *n = pnstrdup(name, namelen);

	if (namelen == 0)
		invalid_request("header names must not be empty");
	for (int i = 0; i < namelen; i++)
		if (!is_token_char((unsigned char) name[i]))
			invalid_request(psprintf("invalid header name \"%s\"", n));
	if (pg_strcasecmp(n, "Content-Length") == 0 || pg_strcasecmp(n, "Transfer-Encoding") == 0 ||
		pg_strcasecmp(n, "Host") == 0)
		invalid_request(psprintf("header \"%s\" is set by jobloop", n));
	if (v->type == jbvString)
		value = pnstrdup(v->val.string.val, v->val.string.len);
	else if (v->type == jbvNumeric)
		value = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	else
		invalid_request(psprintf("header \"%s\" must be a string or a number", n));
	if (has_control_chars(value))
		invalid_request(psprintf("header \"%s\" contains control characters", n));
	if (req->nheaders >= MAX_HEADERS)
		invalid_request("too many headers");
	if (pg_strcasecmp(n, "Idempotency-Key") == 0)
	{
		if (value[0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid request: header \"Idempotency-Key\" is empty"),
					 errhint("Leave the header out to have jobloop send one key per job and step.")));
		req->has_idempotency_key = true;
	}
	if (pg_strcasecmp(n, "Content-Type") == 0)
		req->has_content_type = true;
	/* libcurl reads "Name:" as "remove Name"; "Name;" sends it empty */
	if (value[0] == '\0')
		req->headers[req->nheaders++] = psprintf("%s;", n);
	else
		req->headers[req->nheaders++] = psprintf("%s: %s", n, value);
}

static void
parse_headers(HttpRequest *req, JsonbValue *v)
{
	JsonbIterator *it;
	JsonbValue	key,
				val;
	JsonbIteratorToken tok;

	if (v->type != jbvBinary || !JsonContainerIsObject(v->val.binary.data))
		invalid_request("\"headers\" must be an object");
	req->headers = palloc(MAX_HEADERS * sizeof(char *));
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &key, true)) != WJB_DONE)
	{
		if (tok != WJB_KEY)
			continue;
		(void) JsonbIteratorNext(&it, &val, true);
		add_header(req, key.val.string.val, key.val.string.len, &val);
	}
}

static void
check_body_size(size_t len)
{
	if (len > (size_t) jobloop_max_request_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("request body is %zu bytes, more than jobloop.max_request_size (%d bytes)",
						len, jobloop_max_request_size)));
}

static void
parse_body(HttpRequest *req, JsonbValue *v)
{
	if (v->type == jbvString)
	{
		check_body_size(v->val.string.len);
		req->body = pnstrdup(v->val.string.val, v->val.string.len);
		req->body_len = v->val.string.len;
		return;
	}
	if (v->type == jbvNull)
		return;
	if (v->type == jbvBinary)
	{
		/* JSON text is rarely less than half its jsonb size: refuse early */
		check_body_size(v->val.binary.len / 2);
		req->body = JsonbToCString(NULL, v->val.binary.data, v->val.binary.len);
	}
	else
	{
		Jsonb	   *scalar = JsonbValueToJsonb(v);

		req->body = JsonbToCString(NULL, &scalar->root, VARSIZE(scalar));
	}
	req->body_len = strlen(req->body);
	check_body_size(req->body_len);
	req->body_is_json = true;
}

/* Validate a request and copy it into cxt; raises an error for a bad one. */
HttpRequest *
request_parse(Jsonb *request, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	HttpRequest *req = palloc0(sizeof(HttpRequest));
	JsonbIterator *it;
	JsonbValue	key,
				val;
	JsonbIteratorToken tok;

	if (!JB_ROOT_IS_OBJECT(request) || JB_ROOT_IS_SCALAR(request))
		invalid_request("the request must be a JSON object");

	req->method = pstrdup("GET");
	it = JsonbIteratorInit(&request->root);
	while ((tok = JsonbIteratorNext(&it, &key, true)) != WJB_DONE)
	{
		char	   *k;

		if (tok != WJB_KEY)
			continue;
		k = pnstrdup(key.val.string.val, key.val.string.len);
		(void) JsonbIteratorNext(&it, &val, true);
		if (strcmp(k, "url") == 0)
			req->url = string_value(&val, k);
		else if (strcmp(k, "method") == 0)
			req->method = check_method(string_value(&val, k));
		else if (strcmp(k, "headers") == 0)
			parse_headers(req, &val);
		else if (strcmp(k, "body") == 0)
			parse_body(req, &val);
		else if (strcmp(k, "timeout_ms") == 0)
			req->timeout_ms = int_value(&val, k, 1);
		else if (strcmp(k, "delay_ms") == 0)
			req->delay_ms = int_value(&val, k, 0);
		else if (strcmp(k, "rate_key") == 0)
			req->rate_key = string_value(&val, k);
		else
			invalid_request(psprintf("unrecognized key \"%s\"", k));
		pfree(k);
	}
	if (req->url == NULL)
		invalid_request("\"url\" is missing");
	check_url(req->url);
	if (req->body && (strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0))
		invalid_request(psprintf("a %s request cannot have a body", req->method));
	req->endpoint = endpoint_of(req);

	MemoryContextSwitchTo(old);
	return req;
}

/* A deep copy, so a request parsed in a short-lived context can be kept. */
HttpRequest *
request_copy(const HttpRequest *req, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	HttpRequest *copy = palloc(sizeof(HttpRequest));

	*copy = *req;
	copy->url = pstrdup(req->url);
	copy->method = pstrdup(req->method);
	copy->headers = req->nheaders > 0 ? palloc(req->nheaders * sizeof(char *)) : NULL;
	for (int i = 0; i < req->nheaders; i++)
		copy->headers[i] = pstrdup(req->headers[i]);
	if (req->body)
	{
		copy->body = palloc(req->body_len + 1);
		memcpy(copy->body, req->body, req->body_len);
		copy->body[req->body_len] = '\0';
	}
	copy->rate_key = req->rate_key ? pstrdup(req->rate_key) : NULL;
	copy->endpoint = pstrdup(req->endpoint);
	MemoryContextSwitchTo(old);
	return copy;
}

void
request_free(HttpRequest *req)
{
	if (req == NULL)
		return;
	for (int i = 0; i < req->nheaders; i++)
		pfree(req->headers[i]);
	if (req->headers)
		pfree(req->headers);
	pfree(req->url);
	pfree(req->method);
	if (req->body)
		pfree(req->body);
	if (req->rate_key)
		pfree(req->rate_key);
	if (req->endpoint)
		pfree(req->endpoint);
	pfree(req);
}

/* ---- responses ---- */

/*
 * Text as a jsonb string: what a jsonb string cannot hold (NUL bytes,
 * invalid encoding) is replaced, so a binary or garbled body still reaches
 * the step function.  Clean text, the usual case, is used in place.
 */
static void
text_value(JsonbValue *v, const char *s, size_t len)
{
	StringInfoData clean;
	int			enc = GetDatabaseEncoding();
	size_t		i = 0;

	v->type = jbvString;
	if (memchr(s, '\0', len) == NULL && pg_verifymbstr(s, (int) len, true))
	{
		v->val.string.val = (char *) s;
		v->val.string.len = (int) len;
		return;
	}
	initStringInfo(&clean);
	while (i < len)
	{
		int			n;

		if (s[i] == '\0')
			n = -1;
		else if (IS_HIGHBIT_SET(s[i]))
			n = pg_encoding_verifymbchar(enc, s + i, (int) Min(len - i, INT_MAX));
		else
			n = 1;
		if (n > 0)
		{
			appendBinaryStringInfo(&clean, s + i, n);
			i += n;
		}
		else
		{
			appendStringInfoString(&clean, enc == PG_UTF8 ? "\xEF\xBF\xBD" : "?");
			i++;
		}
	}
	v->val.string.val = clean.data;
	v->val.string.len = clean.len;
}

static bool
body_is_json(const HttpResult *res, const char *content_type)
{
	JsonLexContext *lex;
	size_t		i = 0;

	if (res->body_len == 0 || memchr(res->body, '\0', res->body_len) != NULL ||
		!pg_verifymbstr(res->body, (int) Min(res->body_len, INT_MAX), true))
		return false;
	/* text/plain "42" stays text; a JSON content type or an object/array is JSON */
	while (i < res->body_len && isspace((unsigned char) res->body[i]))
		i++;
	if (!(content_type && strstr(content_type, "json")) &&
		!(i < res->body_len && (res->body[i] == '{' || res->body[i] == '[')))
		return false;
	lex = compat_json_lexer(res->body, res->body_len, GetDatabaseEncoding());
	return pg_parse_json(lex, &nullSemAction) == JSON_SUCCESS;
}

typedef struct HeaderList
{
	int			n;
	char	   *names[MAX_HEADERS];
	StringInfoData values[MAX_HEADERS];
} HeaderList;

/*
 * The response's headers as a step function sees them, from the fields
 * headers.c splits the raw block into: names lower-cased, a repeated
 * header's values joined by ", " (RFC 9110 section 5.3), a folded line
 * joined to its field by a space, and names after the first MAX_HEADERS
 * dropped (http.c caps the block's size, not its number of lines).
 */
static void
parse_response_headers(const HttpResult *res, HeaderList *list)
{
	HeaderIter	it;
	HeaderField field;
	int			last = -1;		/* where a folded line goes; -1: dropped */

	list->n = 0;
	header_iter_init(&it, res->headers, res->headers_len);
	while (header_iter_next(&it, &field))
	{
		char	   *name;
		int			i;

		if (field.continuation)
		{
			if (last >= 0)
			{
				if (list->values[last].len > 0)
					appendStringInfoChar(&list->values[last], ' ');
				appendBinaryStringInfo(&list->values[last], field.value, (int) field.value_len);
			}
			continue;
		}
		name = pnstrdup(field.name, field.name_len);
		for (char *c = name; *c; c++)
			*c = pg_tolower((unsigned char) *c);
		for (i = 0; i < list->n; i++)
			if (strcmp(list->names[i], name) == 0)
				break;
		if (i < list->n)
		{
			pfree(name);
			appendStringInfoString(&list->values[i], ", ");
		}
		else if (list->n < MAX_HEADERS)
		{
			list->names[i] = name;
			initStringInfo(&list->values[i]);
			list->n++;
		}
		else
		{
			pfree(name);
			last = -1;
			continue;
		}
		appendBinaryStringInfo(&list->values[i], field.value, (int) field.value_len);
		last = i;
	}
}

char *
response_header(const HttpResult *res, const char *name)
{
	HeaderList	list;

	parse_response_headers(res, &list);
	for (int i = 0; i < list.n; i++)
		if (pg_strcasecmp(list.names[i], name) == 0)
			return list.values[i].data;
	return NULL;
}

/* Retry-After in milliseconds (see retry_after_ms), or -1 if there is none. */
int64
response_retry_after_ms(const HttpResult *res)
{
	return retry_after_ms(response_header(res, "retry-after"), time(NULL));
}

/* A key: ours are ASCII; a header name comes from the API and is cleaned like text. */
static void
push_key(JsonbParseState **ps, const char *key)
{
	JsonbValue	v;

	text_value(&v, key, strlen(key));
	(void) pushJsonbValue(ps, WJB_KEY, &v);
}

static void
push_number(JsonbParseState **ps, const char *key, int64 n)
{
	JsonbValue	v;

	push_key(ps, key);
	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(n);
	(void) pushJsonbValue(ps, WJB_VALUE, &v);
}

static void
push_null(JsonbParseState **ps, const char *key)
{
	JsonbValue	v;

	push_key(ps, key);
	v.type = jbvNull;
	(void) pushJsonbValue(ps, WJB_VALUE, &v);
}

static void
push_text(JsonbParseState **ps, const char *key, const char *s, size_t len)
{
	JsonbValue	v;

	push_key(ps, key);
	text_value(&v, s, len);
	(void) pushJsonbValue(ps, WJB_VALUE, &v);
}

/*
 * The response, built as jsonb directly: only a JSON body is parsed (once
 * validated, so nothing here can fail on what the API sent); headers and
 * text bodies are never escaped into JSON text and parsed back.
 */
static Jsonb *
build(const HttpResult *res, const char *error, int attempts)
{
	JsonbParseState *ps = NULL;
	HeaderList	list;
	char	   *content_type = NULL;
	JsonbValue *result;

	(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
	if (error)
	{
		push_text(&ps, "error", error, strlen(error));
		push_number(&ps, "attempts", attempts);
	}
	if (res->status > 0)
		push_number(&ps, "status", res->status);
	else
		push_null(&ps, "status");

	push_key(&ps, "headers");
	(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
	parse_response_headers(res, &list);
	for (int i = 0; i < list.n; i++)
	{
		push_text(&ps, list.names[i], list.values[i].data, list.values[i].len);
		if (strcmp(list.names[i], "content-type") == 0)
			content_type = list.values[i].data;
	}
	(void) pushJsonbValue(&ps, WJB_END_OBJECT, NULL);

	if (res->body_len == 0)
	{
		if (res->status > 0)
			push_text(&ps, "body", "", 0);
		else
			push_null(&ps, "body");
	}
	else if (body_is_json(res, content_type))
	{
		Jsonb	   *body = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(res->body)));
		JsonbValue	v;

		push_key(&ps, "body");
		v.type = jbvBinary;
		v.val.binary.data = &body->root;
		v.val.binary.len = VARSIZE(body) - VARHDRSZ;
		(void) pushJsonbValue(&ps, WJB_VALUE, &v);
	}
	else
		push_text(&ps, "body", res->body, res->body_len);
	push_number(&ps, "elapsed_ms", res->elapsed_ms);
	result = pushJsonbValue(&ps, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(result);
}

Jsonb *
response_build(const HttpResult *res)
{
	return build(res, NULL, 0);
}

/* What a kind with on_error = 'step' receives when attempts run out. */
Jsonb *
response_build_error(const HttpResult *res, const char *error, int attempts)
{
	return build(res, error, attempts);
}
