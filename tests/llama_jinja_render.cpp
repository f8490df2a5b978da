// Renders a chat template with llama.cpp's own Jinja engine (common/jinja, the one llama-server,
// llama-cli and the other common_chat users run), for tests/test_chat_template.py.
// llama-cpp-python does not expose this engine (its llama_chat_apply_template only knows built-in
// templates), so the test compiles this file against the pinned llama.cpp source.
//
// usage: llama_jinja_render TEMPLATE_FILE VARS_JSON_FILE
// prints "supports_system_role=0|1" on the first line, then the rendered prompt as is
#include <fstream>
#include <iostream>
#include <sstream>

#include "json.h"
#include "jinja/caps.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"

static std::string read_all(const char * path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::cerr << "usage: llama_jinja_render TEMPLATE_FILE VARS_JSON_FILE\n";
        return 2;
    }
    try {
        const std::string tmpl = read_all(argv[1]);
        const common_json vars = common_json::parse(read_all(argv[2]));
        jinja::lexer lexer;
        auto tokens = lexer.tokenize(tmpl);
        jinja::program prog = jinja::parse_from_tokens(tokens);
        jinja::caps caps = jinja::caps_get(prog);

        jinja::context ctx(tmpl);
        jinja::global_from_json(ctx, vars, true);
        jinja::runtime runtime(ctx);
        const std::string prompt = runtime.gather_string_parts(runtime.execute(prog))->as_string().str();
        std::cout << "supports_system_role=" << (caps.supports_system_role ? 1 : 0) << "\n" << prompt;
    } catch (const std::exception & exc) {
        std::cerr << "error: " << exc.what() << "\n";
        return 1;
    }
    return 0;
}
