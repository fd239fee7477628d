"""setup.py driven by settings.ini (the nbdev 2 layout)."""
from configparser import ConfigParser
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

for o in 'version description keywords author author_email user lib_name min_python license status'.split():
    assert o in cfg, f'missing expected setting: {o}'

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

requirements = shlex.split(cfg.get('requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
eval_requirements = shlex.split(cfg.get('eval_requirements', ''))
lic = licenses[cfg['license'].lower()]
min_python = cfg['min_python']
lib_name = cfg['lib_name']

setuptools.setup(
    name=lib_name,
    license=lic[0],
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'License :: ' + lic[1],
                 'Natural Language :: ' + cfg['language'].title()]
                + ['Programming Language :: Python :: ' + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=[lib_name, lib_name + '.*']),
    include_package_data=True,
    package_data={lib_name: ['assets/*', 'assets/**/*']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'eval': eval_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f'{lib_name}={lib_name}._modidx:d'],
                  'lmms_eval.models': cfg.get('lmms_eval_models', '').split()},
    version=cfg['version'],
    description=cfg['description'],
    author=cfg['author'],
    author_email=cfg['author_email'],
)
